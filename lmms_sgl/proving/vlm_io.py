"""What training needs from a transformers VLM: its visual tokens, its real prompts (chat template and
image-token expansion by the family's processor) and a teacher-forced answer loss on cached tokens."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

POST_PROMPT = "\nAnswer the question using a single word or phrase."  # the sgl_shapes task's prompt


def visual_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(images, tokens, text_hidden)``: what the text model receives for each image."""
    features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def pixel_batch(processor, images) -> torch.Tensor:
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    if pixels.shape[0] != len(images):
        raise ValueError(f"expected one tile per 448 px image, got {pixels.shape[0]} for {len(images)}")
    return pixels


def vision_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())


class PromptCache:
    """Token ids of ``prompt + answer + eos`` per question, with the image placeholder expanded by
    the family's own processor (once per distinct question: the chat template and expansion are the
    real ones, and batches need no image processing)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}
        self._follow_ups: dict[str, list[int]] = {}
        self._blank = Image.new("RGB", (448, 448))

    def prompt_text(self, question: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + POST_PROMPT}]}
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            encoded = self.processor(
                text=[self.prompt_text(question)], images=[self._blank], return_tensors="pt"
            )
            self._prompts[question] = encoded["input_ids"][0].tolist()
        return self._prompts[question]

    def answer(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = ids + [self.tokenizer.eos_token_id]
        return self._answers[answer]

    def follow_up(self, question: str) -> list[int]:
        """A later user turn (no image) of the same conversation, up to the generation prompt."""
        if question not in self._follow_ups:
            messages = [{"role": "user", "content": [{"type": "text", "text": question + POST_PROMPT}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self._follow_ups[question] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._follow_ups[question]

    def batch(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer tokens only)."""
        return self.conversations([[pair] for pair in pairs])

    def conversations(
        self, rows: list[list[tuple[str, str]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`batch` with several questions about one image per row: the first turn is
        exactly the evaluation prompt, later turns reuse the image's tokens (cheaper training)."""
        sequences = []
        for turns in rows:
            ids: list[int] = []
            labels: list[int] = []
            for turn, (question, answer) in enumerate(turns):
                prompt = self.prompt(question) if turn == 0 else self.follow_up(question)
                ids += prompt + self.answer(answer)
                labels += [-100] * len(prompt) + self.answer(answer)
            sequences.append((ids, labels))
        width = max(len(ids) for ids, _ in sequences)
        pad = self.tokenizer.pad_token_id
        ids_out = torch.full((len(rows), width), pad, dtype=torch.long)
        labels_out = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(sequences):
            ids_out[i, : len(ids)] = torch.tensor(ids)
            labels_out[i, : len(ids)] = torch.tensor(labels)
            mask[i, : len(ids)] = 1
        return ids_out, mask, labels_out


def answer_logits_and_loss(
    model, ids, mask, labels, features, hidden=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced forward with cached visual tokens scattered at the image-token positions;
    ``hidden`` (images, tokens) bool masks visual tokens out of attention (the curriculum)."""
    embeds = model.get_input_embeddings()(ids)
    is_image = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(
        is_image.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype).reshape(-1)
    )
    if hidden is not None:
        mask = mask.clone()
        mask[is_image] = (~hidden).reshape(-1).to(mask.dtype)
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def answers_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: every answer token (and the eos) is the argmax, i.e. greedy decoding emits the answer."""
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    return ((predicted == target) | (target == -100)).all(-1)
