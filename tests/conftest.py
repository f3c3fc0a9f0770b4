"""Shared fixtures: a tiny random Llama (4 layers, hidden 64) with a small BPE tokenizer, and a
tiny text corpus, all built offline in a temp dir once per session."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("EDGESTILL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _corrected_teachers_in_a_temp_dir(tmp_path_factory):
    """Tiny teachers corrected by the tests are cached in a temp folder, not in ~/.cache/edgestill."""
    os.environ["EDGESTILL_CORRECTED_CACHE"] = str(tmp_path_factory.mktemp("corrected"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _measured_reference_side_in_a_temp_dir(tmp_path_factory):
    """What broke's cached reference-side numbers (evaluate/measured.py) go to a temp folder, not ~/.cache/edgestill."""
    os.environ["EDGESTILL_MEASURED_CACHE"] = str(tmp_path_factory.mktemp("measured"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _audit_predictions_in_a_temp_dir(tmp_path_factory):
    """The audit's cached teacher predictions (audit/cache.py) go to a temp folder, not ~/.cache/edgestill."""
    os.environ["EDGESTILL_AUDIT_CACHE"] = str(tmp_path_factory.mktemp("audit-cache"))
    yield


WORDS = ("the king queen lord lady love death night day sword crown heart blood speak hear see good "
         "noble fair foul friend enemy war peace thou thee thy art hath doth shall will not what why").split()


def make_text(seed: int, n_lines: int = 200) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n_lines))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A folder of 8 small .txt documents."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"doc{i}.txt").write_text(make_text(i))
    return root


def build_tiny_model(path, num_layers: int = 4, seed: int = 0):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(s) for s in range(20)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tiny_teacher(model_dir):
    """The tiny model in fp32, eval mode (a fresh copy per call, so tests may not share mutations)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def tiny_distill_setup(model_dir, layers: list[int], allow_full: bool = False):
    """(teacher, a factory of students sliced to `layers`, 8 training blocks, 2 val blocks) for trainer tests."""
    import numpy as np

    from edgestill.models.slice import slice_decoder

    teacher = load_tiny_teacher(model_dir)
    rng = np.random.default_rng(0)
    blocks = rng.integers(3, teacher.config.vocab_size, size=(8, 20)).astype(np.int32)
    val = rng.integers(3, teacher.config.vocab_size, size=(2, 20)).astype(np.int32)
    return teacher, (lambda: slice_decoder(teacher, layers, allow_full=allow_full)), blocks, val


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (4 layers, hidden 64, vocab ~300) saved as a HF folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def tiny_overrides(model_dir, corpus_dir, out_dir, steps: int = 6) -> list[str]:
    """Config overrides for an end-to-end run on the tiny model and corpus (seconds on CPU)."""
    return [
        f"teacher.model={model_dir}", f"data.path={corpus_dir}", f"output.dir={out_dir}",
        "data.seq_len=32", "data.max_train_tokens=2048", "data.max_eval_tokens=512", "data.max_val_tokens=256",
        "data.val_fraction=0.2", "data.test_fraction=0.2",
        "student.num_layers=2", f"distill.steps={steps}", "distill.batch_size=4", "distill.top_k=8",
        "distill.checkpoint_every=2", "distill.eval_every=3", "distill.lr=1e-3",
        "eval.batch_size=4", "eval.speed_prompt_tokens=16", "eval.speed_decode_tokens=4", "eval.speed_repeats=1",
        "eval.generate_tokens=4", "eval.prompts=[\"the king\"]", "output.dtype=float32",
        "teacher.correct_steps=4", "teacher.correct_eval_every=2", "teacher.correct_batch_size=2",
        "eval.out_of_domain_tokens=256", "eval.zero_shot_passages=4", "eval.chat_tokens=4",
    ]


def shrunk_run(tmp_path_factory, name: str, model_dir, corpus_dir, *extra: str, steps: int = 6):
    """A finished `edgestill shrink` run on the tiny model (for module fixtures), with its own edgestill cache."""
    from edgestill.cli import main

    out = tmp_path_factory.mktemp(name) / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESTILL_CACHE", str(out.parent / "edgestill-cache"))
        rc = main(["shrink", *tiny_overrides(model_dir, corpus_dir, out, steps=steps), *extra])
    assert rc == 0
    return out


def one_line_error(call, *args, **kwargs) -> str:
    """The EdgestillError message `call(*args)` raises, checked to be one line (the CLI prints it as one)."""
    from edgestill.errors import EdgestillError

    with pytest.raises(EdgestillError) as e:
        call(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def edit_safetensors(st_path, edit) -> None:
    """Rewrite a safetensors file after `edit(state_dict)` changed it in place (to damage a model on purpose)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(st_path))
    edit(state)
    save_file(state, str(st_path), metadata={"format": "pt"})


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny model as a Q8_0 GGUF with a chat template (the serving tests)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgestill.export.gguf import export_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("serve") / "tiny.gguf"
    export_gguf(model, tokenizer, path, tensor_type="q8_0")
    return path


LORA_RANK, LORA_ALPHA = 4, 8.0
LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")


def make_peft_adapter(folder, config, seed=0, scale=0.3, layers=(0, 1)):
    """A PEFT-style LoRA folder for the tiny model: A (r, in) and B (out, r) on MODULES of `layers`."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    head_dim = config.hidden_size // config.num_attention_heads
    outs = {"self_attn.q_proj": config.num_attention_heads * head_dim, "self_attn.o_proj": config.hidden_size,
            "self_attn.k_proj": config.num_key_value_heads * head_dim,
            "self_attn.v_proj": config.num_key_value_heads * head_dim, "mlp.down_proj": config.hidden_size}
    ins = {m: config.hidden_size for m in LORA_MODULES} | {"mlp.down_proj": config.intermediate_size,
                                                       "self_attn.o_proj": config.num_attention_heads * head_dim}
    tensors = {}
    for layer in layers:
        for m in LORA_MODULES:
            key = f"base_model.model.model.layers.{layer}.{m}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((LORA_RANK, ins[m])) * scale).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((outs[m], LORA_RANK)) * scale).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
                                                            "target_modules": list(LORA_MODULES)}))
    return folder
