"""Vision-language fine-tuning on Gemma 3: masks checked token by token on its processor's rendering, the
collator's batch (image tokens marked for the bidirectional image attention) trains, LoRA on the language
model only, adapter reload and merge, learnability; a PaliGemma processor (no chat template) is refused.

The tiny Gemma 3 is built from its config (a text model of hidden 64 and two layers, one sliding and one
global, and a two-layer SigLIP tower on 32x32 images, patch 4: 64 patches pooled to 16 image tokens) with a
`Gemma3Processor` assembled from the BPE tokenizer of tests/test_tasks_vlm.py, Gemma 3's image tokens and a
chat template in Gemma 3's shape. The template writes `<start_of_image>` where an image goes; the processor
expands it to `\\n\\n<start_of_image>`, 16 `<image_soft_token>`, `<end_of_image>\\n\\n`."""

from __future__ import annotations

import pytest

from test_tasks_vlm import (QUESTION, check_reload_and_merge, held_out_accuracy, shape_rows, tokenizer_with,
                            trained_runs, two_turns)

# Gemma 3's template: the system turn folded into the first user turn, the assistant called `model`, texts
# trimmed, each image written as the processor's boi token
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% if messages[0]['content'] is string %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% else %}"
    "{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for m in loop_messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<start_of_image>' }}{% elif c['type'] == 'text' %}{{ c['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
IMAGE_TOKENS = 16  # mm_tokens_per_image: the 8x8 patches pooled 2x2
PROJECTOR_STD = 0.02


def tiny_gemma3():
    """(model, processor): Gemma 3 with a SigLIP tower on 32x32 images, patch 4, pooled to 16 image tokens."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    base = tokenizer_with(["<start_of_turn>", "<end_of_turn>", *GEMMA3_TOKENS.values()])
    # the processor reads boi_token, eoi_token and image_token (and their ids) off the tokenizer, as Gemma 3's
    # tokenizer_config.json names them
    tok = type(base)(tokenizer_object=base.backend_tokenizer, **base.special_tokens_map,
                     extra_special_tokens=dict(GEMMA3_TOKENS))
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=IMAGE_TOKENS,
                                chat_template=GEMMA3_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     query_pre_attn_scalar=16, sliding_window=16,
                                     layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                                     eos_token_id=ids("<end_of_turn>"), pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.bos_token_id),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=4),
        mm_tokens_per_image=IMAGE_TOKENS, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Gemma 3 initialises its projector to zeros (a model built from its config is blind)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, PROJECTOR_STD)
    return model, processor


# ---------------------------------------------------------------------------------------
# Masks, token by token


def test_gemma3_mask_trains_exactly_the_answers(tmp_path):
    from finetune.data import vision_chat as V
    from finetune.data import vision_rows as R

    _, processor = tiny_gemma3()
    tok = processor.tokenizer
    boi, eoi, soft = (tok.convert_tokens_to_ids(t) for t in GEMMA3_TOKENS.values())
    assert processor.boi_token == "<start_of_image>" and processor.image_token_ids == [soft]
    assert {boi, soft} <= V.image_token_ids(processor)
    rows = [*shape_rows(tmp_path, 1, 5), two_turns(tmp_path)]
    (one, two), _ = V.prepare(processor, rows, base=tmp_path)
    assert V.render(processor, R.normalize(rows[1], 1, "data.train")["messages"], False).startswith(
        f"{tok.bos_token}<start_of_turn>user\nYou are a helpful assistant.\n\n<start_of_image>{QUESTION}")
    for example, n_images, answers in ((one, 1, ["a red circle."]), (two, 2, ["a red circle.", "a green square."])):
        ids = example["input_ids"]
        assert [ids.count(t) for t in (boi, soft, eoi)] == [n_images, n_images * IMAGE_TOKENS, n_images]
        runs = trained_runs(example)
        assert [tok.decode(r) for r in runs] == [f"{a}<end_of_turn>" for a in answers]
        assert not {boi, eoi, soft} & {t for r in runs for t in r}
        untrained = tok.decode([t for t, lab in zip(ids, example["labels"])
                                if lab == -100 and t not in (boi, eoi, soft)])
        assert QUESTION in untrained and untrained.count("<start_of_turn>model\n") == len(answers)
        assert not any(a.rstrip(".") in untrained for a in answers)


def test_gemma3_image_tokens_counted_are_the_soft_tokens(tmp_path):
    """The examples' image-token counts (what the memory estimate reads) are the tokens image features fill:
    16 `<image_soft_token>` an image, not its one `<start_of_image>`."""
    from finetune.data import vision_chat as V

    _, processor = tiny_gemma3()
    _, stats = V.prepare(processor, [*shape_rows(tmp_path, 1, 5), two_turns(tmp_path)], base=tmp_path)
    assert stats["image_tokens"] == [IMAGE_TOKENS, 2 * IMAGE_TOKENS]


def test_gemma3_train_on_all_never_trains_an_image_frame(tmp_path):
    """data.train_on=all trains every token but an image's own: `<start_of_image>`, its soft tokens and
    `<end_of_image>` carry no loss."""
    from finetune.data import vision_chat as V

    _, processor = tiny_gemma3()
    tok = processor.tokenizer
    frame = set(tok.convert_tokens_to_ids(list(GEMMA3_TOKENS.values())))
    (example,), _ = V.prepare(processor, [two_turns(tmp_path)], base=tmp_path, train_on="all")
    assert frame <= set(example["input_ids"])
    trained = {t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100}
    assert not tok.convert_ids_to_tokens(sorted(trained & frame))
    assert all(lab in (-100, t) for t, lab in zip(example["input_ids"], example["labels"]))


# ---------------------------------------------------------------------------------------
# The collator's batch: image tokens marked in token_type_ids, which the model needs in training


def test_gemma3_collator_batch_marks_the_image_tokens_and_trains(tmp_path):
    import torch

    from finetune.data import vision_chat as V
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import VisionCollator, train_vlm

    model, processor = tiny_gemma3()
    soft = processor.tokenizer.convert_tokens_to_ids(GEMMA3_TOKENS["image_token"])
    (long, short), _ = V.prepare(processor, [two_turns(tmp_path), *shape_rows(tmp_path, 1, 5)], base=tmp_path)
    batch = VisionCollator(processor)([long, short])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"][0].tolist() == long["labels"]
    row = batch["labels"][1].tolist()
    assert row[:len(short["labels"])] == short["labels"] and set(row[len(short["labels"]):]) == {-100}
    # the soft tokens, and they alone, attend to each other both ways
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == soft).long())
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)

    seen = []
    model.model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("token_type_ids") is not None),
                                          with_kwargs=True)
    model, stats, output = train_vlm(model, processor, shape_rows(tmp_path, 4, 0), tmp_path / "out", base=tmp_path,
                                     lora=LoraSpec(r=4, alpha=8), max_steps=1, per_device_train_batch_size=4)
    assert stats["examples"] == 4 and output.global_step == 1 and seen == [True]
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the step moved them


# ---------------------------------------------------------------------------------------
# LoRA: the language model only, reload and merge


def test_gemma3_lora_targets_the_language_model_and_reloads(tmp_path):
    import re

    import torch

    from finetune.models.adapters import vlm_targets
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import with_lora

    model, processor = tiny_gemma3()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def picked(**kw) -> set[str]:
        return {n for n in linear if re.fullmatch(vlm_targets(model, **kw), n)}

    base_targets = picked()
    assert base_targets and all(n.startswith("model.language_model.") for n in base_targets)
    assert picked(vision=True) - base_targets and all(
        n.startswith("model.vision_tower.") for n in picked(vision=True) - base_targets)

    model.save_pretrained(tmp_path / "base")
    peft_model = with_lora(model, LoraSpec(r=4, alpha=8))
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert adapted and all(".language_model." in n for n in adapted)
    assert not any(k in n for n in adapted for k in ("vision_tower", "multi_modal_projector", "lm_head"))
    check_reload_and_merge(model, peft_model, processor, tmp_path)


# ---------------------------------------------------------------------------------------
# Learnability


def test_a_tiny_gemma3_learns_which_shape_an_image_shows(tmp_path):
    """The learnability test's settings (tests/test_tasks_vlm.py) on Gemma 3: LoRA on the language model alone,
    the random vision tower frozen, held-out answers generated greedily; chance is one in three."""
    accuracy = held_out_accuracy(*tiny_gemma3(), tmp_path)
    print(f"gemma3: held-out exact answers {accuracy:.2f} (chance {1 / 3:.2f})")
    assert accuracy >= 0.8


# ---------------------------------------------------------------------------------------
# Loading processors from disk


def test_gemma3_processor_reloads_with_its_image_tokens(tmp_path):
    from finetune.recipe.sections import ModelSpec
    from finetune.tasks.vlm import load_processor

    _, processor = tiny_gemma3()
    processor.save_pretrained(tmp_path)
    loaded = load_processor(ModelSpec(name=str(tmp_path)))
    assert type(loaded).__name__ == "Gemma3Processor" and loaded.chat_template == GEMMA3_TEMPLATE
    assert loaded.full_image_sequence == processor.full_image_sequence
    assert loaded.image_token_ids == processor.image_token_ids


def test_a_paligemma_processor_has_no_chat_template_and_is_refused(tmp_path):
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    from finetune.errors import UserError
    from finetune.recipe.sections import ModelSpec
    from finetune.tasks.vlm import load_processor

    images = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = IMAGE_TOKENS
    PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer_with(["<image>"])).save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        load_processor(ModelSpec(name=str(tmp_path)))
    message = str(e.value)
    assert message.startswith("data.chat_template: the processor of") and "has no chat template" in message
    assert "\n" not in message


def test_lora_projector_on_a_projector_without_linear_layers_is_refused():
    """Gemma 3's projector is a weight matrix, a norm and a pooling: no layer an adapter can wrap."""
    from finetune.errors import UserError
    from finetune.models.adapters import vlm_targets

    model, _ = tiny_gemma3()
    with pytest.raises(UserError) as e:
        vlm_targets(model, projector=True)
    assert str(e.value) == ("lora.projector: this gemma3 model's projector (model.multi_modal_projector) has no linear "
                            "layer for an adapter; drop lora.projector, or train it in full with "
                            "lora.modules_to_save=[multi_modal_projector]")
    # what the message proposes: the projector trains in full beside the language model's adapters
    from finetune.recipe.sections import LoraSpec
    from finetune.tasks.vlm import with_lora

    peft_model = with_lora(model, LoraSpec(r=4, alpha=8, modules_to_save=["multi_modal_projector"]))
    full = {n.rsplit("default.", 1)[-1] for n, p in peft_model.named_parameters() if p.requires_grad
            and "lora_" not in n}
    assert full == {"mm_input_projection_weight", "mm_soft_emb_norm.weight"}


def test_generate_answers_a_batch_of_prompts_with_different_image_counts(tmp_path):
    """`finetune generate --data` batches: each prompt's images stay its own (one, two and none here)."""
    from finetune.data import vision_rows as R
    from finetune.use.vision import generate_batch, stop_ids

    model, processor = tiny_gemma3()
    two = R.normalize(two_turns(tmp_path), 1, "--data")
    pics = [R.load_image(tmp_path / p, "--data") for p in two["images"]]
    prompts = [(two["messages"][:2], pics[:1]), (two["messages"][:4], pics), ([{"role": "user", "content": [
        {"type": "text", "text": QUESTION}]}], [])]
    answers = generate_batch(model, processor, prompts, 3, 0.0, 1.0, stop_ids(processor))
    alone = [generate_batch(model, processor, [p], 3, 0.0, 1.0, stop_ids(processor))[0] for p in prompts]
    assert answers == alone and all(len(a) <= 3 for a in answers)
