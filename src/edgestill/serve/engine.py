"""One GGUF loaded in llama.cpp (llama-cpp-python) for serving: completions, chat completions with the GGUF's own chat
template, token counts, and the service time a request is predicted to take.

Per-task LoRA adapters (llama.cpp LoRA GGUFs, `adapters`) are loaded once over the resident base weights and
swapped per request; switching empties the KV cache, which the other adapter's weights computed.

The prediction is measured, not assumed: at start the engine times a prefill and a few decode steps of this model on
this machine, and every finished request updates both rates (an exponential moving average), so the scheduler's
costs follow the machine's real speed.
"""

from __future__ import annotations

from pathlib import Path

EWMA = 0.2  # weight of the newest observation in the rate averages


class Engine:
    """A served model. Only the server's worker thread generates; `count_*` may be called from the event loop."""

    def __init__(self, gguf_path, name: str | None = None, n_ctx: int = 2048, n_threads: int = 2,
                 prefix_reuse: bool = True, adapters: dict | None = None):
        from edgestill.runtime.llamacpp import LlamaCpp

        self.path = Path(gguf_path)
        self.name = name or self.path.stem
        self.model = LlamaCpp(self.path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False)
        self.llm = self.model.llm
        self.n_ctx = self.model.n_ctx
        template = (self.llm.metadata or {}).get("tokenizer.chat_template")
        self.has_chat_template = bool(template)
        self._formatter = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab = self.llm
            eos = vocab.detokenize([vocab.token_eos()]).decode(errors="ignore") if vocab.token_eos() >= 0 else ""
            bos = vocab.detokenize([vocab.token_bos()]).decode(errors="ignore") if vocab.token_bos() >= 0 else ""
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self.prefill_tokens_per_s, self.decode_tokens_per_s = self._measure()
        # Prefix reuse: a request whose prompt starts like the previous request's tokens keeps that part of llama.cpp's
        # KV cache and evaluates only the rest (llama-cpp-python's own prefix match; we just do not reset).
        self.prefix_reuse = prefix_reuse
        self.last_reused_tokens = 0
        self.adapters: dict[str, object] = {}
        self.active_adapter: str | None = None
        self.adapter_switches = 0
        try:
            for adapter_name, path in (adapters or {}).items():
                self._load_adapter(adapter_name, Path(path))
        except Exception:
            self.close()
            raise

    # --- LoRA adapters ------------------------------------------------------------------------------------------

    def _load_adapter(self, adapter_name: str, path: Path) -> None:
        import llama_cpp

        from edgestill.errors import EdgestillError
        from edgestill.models.load import check_gguf

        check_gguf(path)
        pointer = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
        if not pointer:
            raise EdgestillError(f"llama.cpp could not load LoRA adapter '{adapter_name}' ({path}) onto "
                                 f"'{self.path.name}': it is not a LoRA GGUF for this model's shape (its log above "
                                 "names the tensor); give each variant adapters made for its own shape")
        self.adapters[adapter_name] = pointer

    def use_adapter(self, adapter_name: str | None) -> None:
        """Apply `adapter_name` (None: the base weights alone) for the next generation."""
        if adapter_name == self.active_adapter:
            return
        import ctypes

        import llama_cpp

        if adapter_name is None:
            llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            pointers = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter_name])
            llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, pointers, 1, (ctypes.c_float * 1)(1.0))
        self.llm.reset()  # the KV cache holds what the other weights computed
        self.active_adapter = adapter_name
        self.adapter_switches += 1

    # --- sizes --------------------------------------------------------------------------------------------------

    def count_prompt(self, prompt: str) -> int:
        return len(self.llm.tokenize(prompt.encode(), add_bos=True, special=False))

    def count_chat(self, messages: list[dict]) -> int:
        """Tokens of the prompt the chat template makes of `messages` (without a template: their contents)."""
        if self._formatter is None:
            return self.count_prompt("\n".join(str(m.get("content", "")) for m in messages))
        text = self._formatter(messages=messages).prompt
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    # --- cost -------------------------------------------------------------------------------------------------

    def predict_s(self, prompt_tokens: int, max_tokens: int) -> float:
        return prompt_tokens / self.prefill_tokens_per_s + max_tokens / self.decode_tokens_per_s

    def observe(self, prompt_tokens: int, completion_tokens: int, first_token_s: float | None, total_s: float) -> None:
        """Fold one served request's timings into the rates. Without a first-token time (a request that was not
        streamed) only the decode rate learns, from the total less the predicted prefill."""
        if first_token_s is not None and prompt_tokens > 0 and first_token_s > 0:
            self.prefill_tokens_per_s += EWMA * (prompt_tokens / first_token_s - self.prefill_tokens_per_s)
        if first_token_s is None:
            decode_s, decoded = total_s - prompt_tokens / self.prefill_tokens_per_s, completion_tokens
        else:
            decode_s, decoded = total_s - first_token_s, completion_tokens - 1
        if decoded > 0 and decode_s > 0:
            self.decode_tokens_per_s += EWMA * (decoded / decode_s - self.decode_tokens_per_s)

    def _measure(self, prompt_tokens: int = 32, decode_tokens: int = 16) -> tuple[float, float]:
        """(prefill tokens/s, decode tokens/s) of this model here (runtime.llamacpp's timing), after one warm-up: the
        first generation pays one-off costs (buffers, graphs) that would make every prediction far too slow."""
        ids = self.llm.tokenize(b" the" * prompt_tokens, add_bos=False)[:prompt_tokens]
        self.model.time_tokens(ids, decode_tokens)
        return self.model.time_tokens(ids, decode_tokens)

    # --- generation (the worker thread only) --------------------------------------------------------------------

    def _state(self) -> list[int]:
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def _begin(self) -> list[int]:
        if not self.prefix_reuse:
            self.llm.reset()  # every request from an empty state
        return self._state()

    def finish(self, before: list[int], prompt_tokens: int) -> int:
        """After a request: how many of its prompt tokens llama.cpp took from the KV cache instead of evaluating
        (its rule: the common prefix with the previous tokens, one less when that covers the whole prompt)."""
        prompt = self._state()[:prompt_tokens]
        common = 0
        for a, b in zip(before, prompt):
            if a != b:
                break
            common += 1
        self.last_reused_tokens = common - 1 if common and common == len(prompt) else common
        return self.last_reused_tokens

    def complete(self, stream: bool, adapter: str | None = None, **kwargs):
        """(llama.cpp's completion or stream of chunks, the tokens before it for `finish`)."""
        self.use_adapter(adapter)
        before = self._begin()
        return self.llm.create_completion(stream=stream, model=self.name, **kwargs), before

    def chat(self, stream: bool, adapter: str | None = None, **kwargs):
        self.use_adapter(adapter)
        before = self._begin()
        return self.llm.create_chat_completion(stream=stream, model=self.name, **kwargs), before

    def close(self) -> None:
        import llama_cpp

        if self.adapters and self.active_adapter is not None:
            llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        for pointer in self.adapters.values():
            llama_cpp.llama_adapter_lora_free(pointer)
        self.adapters = {}
        self.model.close()
