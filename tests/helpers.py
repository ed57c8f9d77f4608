"""Small helpers shared by the method tests: load a factory checkpoint, build a batch."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

QUESTIONS = ["What color is the circle?", "Is it?", "How many objects are there in the picture?"]
SIZES = [(800, 500), (448, 448), (300, 900)]
COLORS = [(120, 30, 200), (10, 130, 200), (200, 200, 40)]


def load(path: Path, attn_implementation="sdpa"):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    return model, processor


def prompt(processor, question: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def batch(processor, indices=(0, 1)):
    texts = [prompt(processor, QUESTIONS[i]) for i in indices]
    images = [Image.new("RGB", SIZES[i], COLORS[i]) for i in indices]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def greedy(model, inputs, steps=5, **kwargs):
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kwargs)
