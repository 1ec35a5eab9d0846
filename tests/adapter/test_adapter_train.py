"""Stage-2 training end to end on generated data with a planted user signal (each user prefers
two genres): the USER-LLM adapter learns the favourite-genre task, lowers its loss and beats
the same LLM trained without user tokens; resume continues exactly."""
from __future__ import annotations

import pytest
import torch

from training.config import AdapterConfig, AdapterTrainConfig
from training.evaluate_adapter import evaluate, load_arm
from training.tasks import Catalogue, task_split, held_out_examples

pytestmark = pytest.mark.xdist_group("adapter")
TASKS = ["genre_history"]
TRAIN = dict(batch_size=16, lr=3e-3, per_user=3, lengths=[10, 30], valid_examples=48)


def _test_accuracy(name, tiny_llm, adapter, histories) -> float:
    cat = Catalogue.from_histories(histories.values())
    examples = held_out_examples(task_split(histories, 1), TASKS, cat, 30)
    arm = load_arm(name, tiny_llm, adapter)
    try:
        return evaluate(arm, examples, cat)["genre_history"]["accuracy"]
    finally:
        arm.close()


def test_planted_signal_userllm_beats_no_user_tokens(tmp_path, tiny_llm, tiny_encoder,
                                                     sample_histories):
    from training.train_adapter import train_adapter

    torch.manual_seed(0)
    tcfg = AdapterTrainConfig(epochs=3, validate_first=True, **TRAIN)
    user = train_adapter(sample_histories, tiny_llm, tiny_encoder,
                         AdapterConfig(arm="userllm", strategy="enc", tasks=TASKS,
                                       cross_every_n=2, num_user_tokens=2),
                         tcfg, tmp_path / "userllm", progress=False)
    # The same LLM, every weight trainable, but no user tokens: it can learn the label prior.
    none = train_adapter(sample_histories, tiny_llm, tiny_encoder,
                         AdapterConfig(arm="none", strategy="full", tasks=TASKS),
                         tcfg, tmp_path / "none", progress=False)
    first = user.history[0]["valid_loss"]["all"]
    assert user.best_loss < 0.5 * first, (first, user.best_loss)
    acc_user = _test_accuracy("userllm", tiny_llm, tmp_path / "userllm", sample_histories)
    acc_none = _test_accuracy("none", tiny_llm, tmp_path / "none", sample_histories)
    # 8 genres: the prior alone gets ~1/8-1/4; the user tokens carry each user's taste.
    assert acc_user >= acc_none + 0.15, (acc_user, acc_none)
    assert user.parameters["encoder"] > 0 and user.parameters["user_modules"] > 0
    assert user.parameters["llm_base"] == 0 and none.parameters["encoder"] == 0


def test_gates_at_zero_equal_the_base_model(tiny_llm, tiny_encoder, sample_histories):
    """A fresh adapter (gates 0) with real user tokens computes exactly the base model."""
    from llm.loader import load_model
    from training.adapter_data import collate, encode_examples
    from training.tasks import train_examples
    from training.train_adapter import build_stage2

    acfg = AdapterConfig(arm="userllm", strategy="enc", tasks=TASKS, cross_every_n=1,
                         num_user_tokens=2)
    s2 = build_stage2(tiny_llm, tiny_encoder, acfg, sample_histories)
    base, _, _ = load_model(tiny_llm)
    exs = train_examples(task_split(sample_histories, 1).train, TASKS, s2.catalogue, 1, [20], 0)
    items = encode_examples(exs[:6], "userllm", s2.tokenizer, s2.end_token, 512,
                            s2.enc_tokenizer)
    b = collate(items, s2.pad_token, s2.enc_tokenizer, s2.enc_max_len)
    with torch.no_grad():
        tokens, mask = s2.model.user_tokens(b.enc_ids, b.enc_valid)
        assert tokens.abs().sum() > 0
        ours = s2.model.llm(b.input_ids, user_tokens=tokens, user_mask=mask)
        plain = base(b.input_ids)
    assert torch.equal(ours, plain)


def test_resume_ends_where_a_straight_run_ends(tmp_path, monkeypatch, tiny_llm, tiny_encoder,
                                               sample_histories):
    import training.train_adapter as ta
    from safetensors.torch import load_file

    acfg = AdapterConfig(arm="userllm", strategy="proj", tasks=TASKS, cross_every_n=2,
                         num_user_tokens=2)
    tcfg = AdapterTrainConfig(epochs=2, **(TRAIN | {"per_user": 1}))
    straight = ta.train_adapter(sample_histories, tiny_llm, tiny_encoder, acfg, tcfg,
                                tmp_path / "straight", progress=False)
    real, calls = ta.length_batches, []

    def dies_in_epoch_two(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # after epoch 1 validated and saved its state
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ta, "length_batches", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        ta.train_adapter(sample_histories, tiny_llm, tiny_encoder, acfg, tcfg, tmp_path / "cut",
                         progress=False)
    monkeypatch.setattr(ta, "length_batches", real)
    resumed = ta.train_adapter(sample_histories, tiny_llm, tiny_encoder, acfg, tcfg,
                               tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == straight.steps > 0
    assert [h["valid_loss"] for h in resumed.history] == [h["valid_loss"] for h in straight.history]
    for name in ("llm.safetensors", "encoder.safetensors"):
        a = load_file(str(tmp_path / "straight.last" / name))
        b = load_file(str(tmp_path / "cut.last" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bf16_autocast_trains_like_fp32_and_saves_fp32(tmp_path, tiny_llm, tiny_encoder, sample_histories):
    """--bf16: the training forward under bf16 autocast (the frozen LLM's products included)
    lowers the loss as fp32 does; the saved weights and the validation stay fp32."""
    from safetensors.torch import load_file

    from training.train_adapter import train_adapter

    acfg = AdapterConfig(arm="userllm", strategy="proj", tasks=TASKS, cross_every_n=2,
                         num_user_tokens=2)
    runs = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        tcfg = AdapterTrainConfig(epochs=2, validate_first=True, bf16=bf16, **TRAIN)
        runs[bf16] = train_adapter(sample_histories, tiny_llm, tiny_encoder, acfg, tcfg,
                                   tmp_path / f"bf16_{bf16}", progress=False)
    first = runs[False].history[0]["valid_loss"]["all"]
    assert runs[True].history[0]["valid_loss"]["all"] == first  # the same start, validated in fp32
    for run in runs.values():
        assert run.best_loss < 0.8 * first, (first, run.best_loss)
    assert abs(runs[True].best_loss - runs[False].best_loss) < 0.1 * runs[False].best_loss
    saved = load_file(str(tmp_path / "bf16_True" / "llm.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
