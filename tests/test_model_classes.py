"""The table of transformers model classes (lorasurgeon/formats/model_classes.json) against transformers itself:
each class's tied weights are its `_tied_weights_keys`, its task type the auto class that loads it."""

from __future__ import annotations

import json

import pytest
from model_classes_table import TABLE, build

from lorasurgeon.formats.model_classes import auto_mapping, model_class, task_type

pytestmark = pytest.mark.oracle

# Tied or not, the classes people fine-tune with LoRA most, and a few that tie nothing.
NAMED = [
    "LlamaForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "FalconForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "T5ForConditionalGeneration",
    "BartForConditionalGeneration",
    "WhisperForConditionalGeneration",
    "BertForMaskedLM",
    "RobertaForMaskedLM",
    "DistilBertForMaskedLM",
    "ModernBertForMaskedLM",
    "BertForSequenceClassification",
    "LlamaForSequenceClassification",
    "CLIPTextModel",
]


@pytest.mark.parametrize("name", NAMED)
def test_tied_weights_are_transformers_own(name: str) -> None:
    import transformers

    found = model_class({"architectures": [name]})
    assert found is not None, name
    assert dict(found.tied) == dict(getattr(transformers, name)._tied_weights_keys or {})


def test_heads_are_named_as_each_architecture_names_them() -> None:
    heads = {
        name: sorted(found.tied)
        for name in ("BertForMaskedLM", "WhisperForConditionalGeneration", "T5ForConditionalGeneration")
        if (found := model_class({"architectures": [name]})) is not None
    }
    assert heads == {
        "BertForMaskedLM": ["cls.predictions.decoder.bias", "cls.predictions.decoder.weight"],
        "WhisperForConditionalGeneration": ["proj_out.weight"],
        "T5ForConditionalGeneration": ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight"],
    }
    assert not model_class({"architectures": ["BertForSequenceClassification"]}).tied  # type: ignore[union-attr]
    assert model_class({"architectures": ["MyOwnForCausalLM"]}) is None


def test_t5_ties_whatever_its_config_says() -> None:
    """transformers v5's T5Config sets tie_word_embeddings true, and reads the given value as scale_decoder_outputs."""
    from transformers import T5Config

    assert T5Config(tie_word_embeddings=False).tie_word_embeddings is True
    assert model_class({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}).forced_tie  # type: ignore[union-attr]
    assert not model_class({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).forced_tie  # type: ignore[union-attr]


def test_task_types_and_auto_mapping() -> None:
    """Only task types whose AutoPeftModelFor<Task> loads the class; anything else gets PEFT's auto_mapping."""
    assert task_type({"architectures": ["Qwen2ForCausalLM"]}) == "CAUSAL_LM"
    assert task_type({"architectures": ["T5ForConditionalGeneration"]}) == "SEQ_2_SEQ_LM"
    assert task_type({"architectures": ["MyOwnForCausalLM"]}) == "CAUSAL_LM"
    assert task_type({"architectures": ["BertForSequenceClassification"]}) is None  # SEQ_CLS would add a head
    assert task_type({"architectures": ["WhisperForConditionalGeneration"]}) is None
    assert auto_mapping({"architectures": ["CLIPTextModel"]}) == {
        "base_model_class": "CLIPTextModel",
        "parent_library": "transformers",
    }
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}
    assert auto_mapping(unet) == {"base_model_class": "UNet2DConditionModel", "parent_library": "diffusers"}


@pytest.mark.slow
def test_table_is_current() -> None:
    """The whole table equals what the installed transformers gives (imports every model class: about a minute).
    After a transformers upgrade: python tests/model_classes_table.py."""
    assert json.loads(TABLE.read_text()) == build()
