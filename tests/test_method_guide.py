"""Oracle tests for the guide: importance, confidence, consistency, answer lengths."""

from __future__ import annotations

import pytest
import torch

from lmms_sgl.method.early_exit import exit_score, should_exit
from lmms_sgl.method.guide import answer_lengths, consistency_pass, positions_from_mask, run_guide
from lmms_sgl.method.importance import (
    ATTENTION_NAME,
    AttentionRecorder,
    prompt_rows_from_last_visual,
    visual_scores,
)
from tests.helpers import batch, greedy, load, prompt

ATTN = {"text_config": ATTENTION_NAME, "vision_config": "sdpa"}


@pytest.fixture(scope="module", params=["internvl", "llava"])
def guides(request, models_dir):
    """The guide twice: with the recording attention, and with eager (the oracle)."""
    path = models_dir / f"{request.param}-guide"
    recording, processor = load(path, ATTN)
    eager, _ = load(path, "eager")
    return recording, eager, processor


def eager_importance(model, inputs, rows, steps):
    """Independent path: transformers' own eager output_attentions, summed by hand."""
    out = greedy(model, inputs, steps, output_attentions=True, return_dict_in_generate=True)
    prompt_len = inputs.input_ids.shape[1]
    total = torch.zeros(inputs.input_ids.shape, dtype=torch.float32)
    for step, per_layer in enumerate(out.attentions[:steps]):
        for attn in per_layer:  # [B, H, q, kv]
            if step == 0:
                total += torch.einsum("bhqk,bq->bk", attn[..., :prompt_len], rows.float())
            else:
                total += attn[:, :, 0, :prompt_len].sum(1)
    return out.sequences, total


def test_importance_equals_eager_output_attentions(guides):
    recording, eager, processor = guides
    inputs = batch(processor, (0, 1))
    vis = inputs.input_ids == recording.config.image_token_id
    rows = prompt_rows_from_last_visual(vis, inputs.attention_mask)
    steps = 6
    recorder = AttentionRecorder(rows)
    with recorder.active():
        sequences = greedy(recording, inputs, steps)
    mass = recorder.finalize([steps - 1, steps - 1])
    reference_sequences, reference = eager_importance(eager, inputs, rows, steps)
    assert torch.equal(sequences, reference_sequences), "recording must not change the generated tokens"
    assert mass[vis].sum() > 0
    torch.testing.assert_close(mass, reference, rtol=1e-5, atol=1e-5)


def test_recording_does_not_change_generation(guides):
    recording, _, processor = guides
    inputs = batch(processor, (0, 2))
    plain = greedy(recording, inputs, 6)
    recorder = AttentionRecorder(
        prompt_rows_from_last_visual(
            inputs.input_ids == recording.config.image_token_id, inputs.attention_mask
        )
    )
    with recorder.active():
        recorded = greedy(recording, inputs, 6)
    assert torch.equal(plain, recorded)


def test_prompt_rows_start_at_the_last_visual_token():
    vis = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.ones(2, 7, dtype=torch.long)
    rows = prompt_rows_from_last_visual(vis, mask)
    assert rows[0].tolist() == [False, False, False, False, True, True, True]
    assert not rows[1].any(), "text-only samples have no prompt rows"
    assert [len(s) for s in visual_scores(torch.ones(2, 7), vis)] == [3, 0]


def test_finalize_drops_steps_after_each_samples_answer():
    recorder = AttentionRecorder(torch.ones(2, 3, dtype=torch.bool))
    recorder.decode_steps = [torch.full((2, 3), float(s + 1)) for s in range(3)]
    mass = recorder.finalize([1, 3])
    assert mass[0].tolist() == [1.0, 1.0, 1.0] and mass[1].tolist() == [6.0, 6.0, 6.0]


def test_run_guide_confidence_matches_scores_by_hand(guides):
    recording, _, processor = guides
    inputs = batch(processor, (0, 1))
    vis = inputs.input_ids == recording.config.image_token_id
    eos = [processor.tokenizer.eos_token_id]
    run = run_guide(recording, recording.model.language_model, inputs, vis, 5, eos, processor.tokenizer)
    out = recording.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=5,
        min_new_tokens=1,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences[:, inputs.input_ids.shape[1] :], run.generated)
    for b in range(2):
        n = int(run.lengths[b])
        logp = [torch.log_softmax(out.scores[t][b].double(), -1)[run.generated[b, t]] for t in range(n)]
        expected = torch.exp(torch.stack(logp).mean())
        torch.testing.assert_close(run.confidence[b].double(), expected, rtol=1e-5, atol=1e-7)
        assert len(run.importance[b]) == int(vis[b].sum())


def test_consistency_matches_a_hand_computation(guides):
    recording, _, processor = guides
    inputs = batch(processor, (0, 1))
    vis = inputs.input_ids == recording.config.image_token_id
    text_model = recording.model.language_model
    run = run_guide(
        recording, text_model, inputs, vis, 4, [processor.tokenizer.eos_token_id], processor.tokenizer
    )
    ratio = 0.05
    scores = consistency_pass(recording, text_model, run, ratio)
    embeds = text_model.get_input_embeddings()
    for b in range(2):
        n = int(run.lengths[b])
        real = inputs.attention_mask[b].bool()
        visual_positions = vis[b].nonzero().flatten()
        k = max(1, int(len(visual_positions) * ratio))
        top = visual_positions[torch.topk(run.importance[b], k).indices]
        keep = torch.sort(torch.cat([(real & ~vis[b]).nonzero().flatten(), top])).values
        positions = positions_from_mask(inputs.attention_mask[b : b + 1])[0]
        seq_embeds = torch.cat([run.prompt_embeds[b, keep], embeds(run.generated[b, :n])])
        seq_positions = torch.cat([positions[keep], positions[real].max() + 1 + torch.arange(n)])
        with torch.no_grad():
            logits = recording(inputs_embeds=seq_embeds[None], position_ids=seq_positions[None]).logits[0]
        logp = torch.log_softmax(logits[len(keep) - 1 : len(keep) - 1 + n].double(), -1)
        expected = torch.exp(logp.gather(1, run.generated[b, :n, None]).sum())
        torch.testing.assert_close(scores[b].double(), expected, rtol=1e-4, atol=1e-9)


def test_consistency_pass_handles_text_only_samples(guides):
    recording, _, processor = guides
    texts = [prompt(processor, "How many objects are there?", with_image=False)]
    inputs = processor.tokenizer(texts, return_tensors="pt")
    vis = torch.zeros_like(inputs.input_ids, dtype=torch.bool)
    text_model = recording.model.language_model
    run = run_guide(recording, text_model, dict(inputs), vis, 3, [processor.tokenizer.eos_token_id])
    assert run.importance[0].numel() == 0
    score = consistency_pass(recording, text_model, run, 0.05)
    assert 0 < float(score[0]) <= 1


def test_answer_lengths_stop_at_eos_and_stop_strings(guides):
    _, _, processor = guides
    tok = processor.tokenizer
    ids = tok("red\n\nblue", add_special_tokens=False).input_ids
    generated = torch.tensor([ids + [tok.eos_token_id] * 2, [tok.eos_token_id] + ids + [0]])
    assert answer_lengths(generated, [tok.eos_token_id]).tolist() == [len(ids) + 1, 1]
    cut = answer_lengths(generated[:1], [tok.eos_token_id], tok, ["\n\n"])
    assert tok.decode(ids[: int(cut[0])]).endswith("\n\n") and "blue" not in tok.decode(ids[: int(cut[0])])


def test_exit_decision():
    score = exit_score(torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.2]))
    assert score.tolist() == pytest.approx([0.7, 0.2])
    assert should_exit(score, 0.6).tolist() == [True, False]
    assert should_exit(score, None).tolist() == [False, False]


def test_stop_string_search_matches_a_linear_scan(guides):
    _, _, processor = guides
    tok = processor.tokenizer
    ids = tok("red blue\n\ngreen yellow\n\nmore", add_special_tokens=False).input_ids
    linear = next(i for i in range(1, len(ids) + 1) if "\n\n" in tok.decode(ids[:i]))
    assert answer_lengths(torch.tensor([ids]), [tok.eos_token_id], tok, ["\n\n"]).tolist() == [linear]
    assert answer_lengths(torch.tensor([ids]), [tok.eos_token_id], tok, ["absent"]).tolist() == [len(ids)]
