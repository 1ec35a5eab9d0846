"""The engine serves what was evaluated, on the real trained adapter: teacher-forced logits of the
training forward pass (dense, the UserLLM module train-adapter optimises) against the engine's
paged path (Engine.from_pretrained(adapter=...), prefill + decode through BeamSearch.
forced_logits), fp32 CPU, on held-out ML-1M questions at several history lengths.

    python bench/userllm_parity.py --adapter bench/.work/userllm/ml1m/userllm [--users 4]

Target: max |logit difference| <= 1e-4 (the tests check the same on tiny models).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, markdown_table, write_results  # noqa: E402

from training.adapter_checkpoint import (  # noqa: E402
    adapter_config,
    adapter_meta,
    load_adapter_encoder,
)
from training.adapter_data import encode_examples  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.tasks import held_out_examples, task_split  # noqa: E402
from training.train_adapter import build_stage2  # noqa: E402


def training_model(adapter: Path, histories):
    """The training-side module with the adapter's trained tensors loaded, as train-adapter
    held it when it saved them."""
    meta = adapter_meta(adapter)
    s2 = build_stage2(meta["base_model"]["path"], meta["encoder"]["checkpoint"],
                      adapter_config(adapter), histories)
    for module, file in ((s2.model.llm, "llm.safetensors"),
                         (s2.model.encoder, "encoder.safetensors")):
        trained = load_file(str(adapter / file))
        missing = set(trained) - set(module.state_dict())
        assert not missing, f"{file} names tensors the module lacks: {sorted(missing)[:3]}"
        module.load_state_dict(trained, strict=False)
    s2.model.eval()
    return s2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=str(Path(__file__).resolve().parent / ".work" / "userllm"
                                             / "ml1m" / "userllm"))
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--ns", default="50,500")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from llm.engine.beam_search import BeamSearch
    from llm.engine.engine import Engine

    adapter = Path(a.adapter)
    meta = adapter_meta(adapter)
    histories = load_dataset(a.data, "movielens").histories
    s2 = training_model(adapter, histories)
    split = task_split(histories, s2.holdout)
    users = sorted(u for u, h in split.test.items() if len(h) - split.holdout >= 500)[:a.users]
    encoder = load_adapter_encoder(adapter)
    engine = Engine.from_pretrained(meta["base_model"]["path"], adapter=adapter)
    rows, worst = [], 0.0
    try:
        for n in (int(x) for x in a.ns.split(",")):
            exs = held_out_examples(split, s2.model.cfg.tasks, s2.catalogue, n, users)
            items = encode_examples(exs, "userllm", s2.tokenizer, s2.end_token, 8160,
                                    s2.enc_tokenizer)
            for ex, it in zip(exs, items):
                ids, valid = encoder.batch([ex.history])
                served = encoder.user_tokens([ex.history])[0]  # what serving computes
                with torch.no_grad():
                    tokens, mask = s2.model.user_tokens(ids, valid)
                    seq = torch.tensor([it.prompt + it.answer[:-1]])
                    dense = s2.model.llm.compute_logits(
                        s2.model.llm(seq, user_tokens=tokens, user_mask=mask))[0]
                paged = BeamSearch(engine.model).forced_logits(it.prompt, it.answer[:-1], served)
                token_diff = float((served - tokens[0]).abs().max())
                diff = float((paged - dense[len(it.prompt) - 1:].float()).abs().max())
                worst = max(worst, diff, token_diff)
                rows.append([n, ex.task, len(it.prompt), len(it.answer), token_diff, diff])
                print(f"N={n} {ex.task}: prompt {len(it.prompt)} tokens, answer "
                      f"{len(it.answer)}, user tokens |diff| {token_diff:.2e}, logits max "
                      f"|diff| {diff:.2e}", flush=True)
    finally:
        engine.close()
    table = ("# USER-LLM parity: training forward vs the engine's paged path\n\n"
             f"Adapter {adapter.name} ({meta['strategy']}, {meta['config']['integration']}), "
             f"{len(users)} users, fp32 CPU. Worst max |logit diff| {worst:.2e} "
             "(target <= 1e-4).\n\n"
             + markdown_table(["N", "task", "prompt tokens", "answer tokens", "user tokens max |diff|",
                               "logits max |diff|"],
                              [r[:4] + [f"{r[4]:.2e}", f"{r[5]:.2e}"] for r in rows]))
    write_results("userllm_parity", vars(a), {"worst_max_abs_diff": worst, "rows": rows}, table)
    print(f"worst max |diff| {worst:.2e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
