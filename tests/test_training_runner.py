"""The generic trainer run's adjustment to TRL: its fused LM head scores only labelled positions
on a CPU too, with the same values (ecg_r1.training.runner.score_labelled_positions_only)."""

from __future__ import annotations

import torch


def test_cpu_fused_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(monkeypatch):
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.kernels.chunked_logprob import _use_triton as trl_use_triton
    from trl.trainer.utils import add_fused_lm_head

    from ecg_r1.training.runner import score_labelled_positions_only

    # TRL's own choice for this test (an earlier trainer run in this process may have patched it),
    # restored afterwards
    monkeypatch.setattr(trl_utils, "_use_triton", trl_use_triton)
    scored_rows: list[int] = []
    chunked = trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *args):
            scored_rows.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=500,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 500, (2, 20))
    labels = ids.clone()
    labels[:, :15] = -100  # a prompt of 15 tokens, an answer of 5

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return out, grads

    every, every_grads = run()
    score_labelled_positions_only()
    score_labelled_positions_only()  # idempotent: one wrapper, not two
    labelled, labelled_grads = run()

    assert scored_rows == [2 * 19, 2 * 5]  # after the shift: 19 positions a row, 5 of them labelled
    torch.testing.assert_close(labelled.loss, every.loss)
    torch.testing.assert_close(labelled.log_probs, every.log_probs)
    torch.testing.assert_close(labelled.entropy, every.entropy)
    for a, b in zip(labelled_grads, every_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(labelled.log_probs[:, :14]) == 0  # unlabelled positions stay 0
