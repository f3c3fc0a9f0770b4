"""A PEFT LoRA adapter (a folder with adapter_config.json and adapter_model.safetensors) as a llama.cpp LoRA GGUF,
the file `edgestill serve --lora` swaps in per request over resident base weights.

llama.cpp's adapter format: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for each
adapted weight `blk.N.<tensor>.weight.lora_a` (rank x in) and `.lora_b` (out x rank); llama.cpp adds
alpha / rank x B A to the base weight's product. The Q and K rows are permuted for llama.cpp's RoPE, as the base
export does (export/gguf.permute_for_rope), so B's rows follow them. Only safetensors are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from edgestill.errors import EdgestillError

_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.\d+\.[a-z_.]+_proj)\.lora_([AB])(?:\.[a-z]+)?\.weight$")


def read_peft_adapter(folder) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, int]:
    """({HF module name: (A (rank, in), B (out, rank))}, lora_alpha, rank) of a PEFT LoRA folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise EdgestillError(f"'{folder}' is not a PEFT LoRA adapter folder (it needs adapter_config.json and "
                             "adapter_model.safetensors; a .bin adapter is refused: save it with safetensors)")
    config = json.loads(config_path.read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise EdgestillError(f"'{folder}' is a {config.get('peft_type')} adapter; only LoRA adapters can be served")
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", config.get("r", 8)))
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(weights_path)).items():
        m = _KEY.match(key)
        if m is None:
            raise EdgestillError(f"adapter tensor '{key}' in '{weights_path}' is not a LoRA A/B weight of a decoder "
                                 "layer projection; llama.cpp adapters cover the q/k/v/o and gate/up/down projections")
        halves.setdefault(m.group(1), {})[m.group(2)] = value.astype(np.float32)
    pairs = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise EdgestillError(f"adapter '{folder}' has lora_{'A' if 'A' in ab else 'B'} but not its pair for {module}")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise EdgestillError(f"adapter '{folder}', {module}: A {a.shape} and B {b.shape} do not have rank {rank}")
        pairs[module] = (a, b)
    if not pairs:
        raise EdgestillError(f"adapter '{folder}' holds no LoRA weights")
    return pairs, alpha, rank


def export_lora_gguf(adapter_folder, base_gguf, out) -> Path:
    """Write the PEFT adapter in `adapter_folder` as a llama.cpp LoRA GGUF for the model in `base_gguf` (its head
    counts decide the RoPE permutation; each adapted weight's shape is checked against the base's); atomic."""
    import gguf

    from edgestill.export.gguf import hf_to_gguf_name, permute_for_rope
    from edgestill.files import atomic_path

    pairs, alpha, rank = read_peft_adapter(adapter_folder)
    reader = gguf.GGUFReader(str(base_gguf))
    arch = reader.fields["general.architecture"].contents()
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads
    base_shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # (out, in), as torch
    out = Path(out)
    with atomic_path(out, "writing the LoRA GGUF") as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, (a, b) in sorted(pairs.items()):
            name = hf_to_gguf_name(module + ".weight")
            base_shape = base_shapes.get(name)
            if base_shape != (b.shape[0], a.shape[1]):
                raise EdgestillError(f"adapter {module} is {b.shape[0]} x {a.shape[1]}, but the base model's weight is "
                                     f"{base_shape or 'missing'}: the adapter was trained for another model")
            if module.endswith("self_attn.q_proj"):
                b = permute_for_rope(b, heads)
            elif module.endswith("self_attn.k_proj"):
                b = permute_for_rope(b, kv_heads)
            writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a))
            writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
