"""Generation engines behind one interface: greedy answers to chat prompts, with timing and footprint.

- `HFEngine`: an HF checkpoint (dir, Hub id from the local cache, the bundled model) or an adapter on a freshly
  loaded base. Batched greedy `generate` with left padding, stopping at the end-of-turn token.
- `GGUFEngine`: a .gguf file through `llama_cpp.Llama.create_chat_completion` (the file's own chat template).
- `EndpointEngine`: an OpenAI-compatible server, `http://host:port/v1#model-name`, through httpx.

All of them decode greedily (temperature 0, no repetition penalty) from the same prompt messages. Heavy imports
(torch, transformers, peft, llama_cpp) happen inside `load`.
"""

from __future__ import annotations

import abc
import gc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneship.artifacts import RECORD, read_record, sha256_bytes, sha256_dir, sha256_file
from tuneship.errors import TuneshipError
from tuneship.models import ModelSpec
from tuneship.progress import bar

# OpenMP threads that spin while waiting make a CPU shared with other jobs crawl: with 2 torch threads on 2 busy
# cores, greedy decoding measured 7-10x slower than with sleeping waiters. Takes effect only when set before
# torch (or llama.cpp) starts its thread pool; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STOP_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class EngineOptions:
    max_new_tokens: int = 64
    batch_size: int = 16
    timeout_s: float = 120.0
    device: str = "auto"
    n_ctx: int = 4096
    threads: int | None = None  # None: os.cpu_count()
    seed: int = 0
    allow_pickle: bool = False
    chat_template: str | None = None  # template text that replaces the model's own (HF engines only)
    stop_tokens: tuple[str, ...] = ()  # extra end-of-turn tokens recorded at training (HF engines)


@dataclass
class Generation:
    text: str
    new_tokens: int
    latency_s: float


@dataclass
class EngineResult:
    outputs: list[Generation]
    template: dict  # {chat_template_sha256, stop_tokens}
    footprint: dict  # {file_bytes, peak_rss_bytes, rss_delta_bytes, cuda_peak_bytes, load_s}
    identity: dict
    kind: str


def recorded_settings(spec: ModelSpec) -> dict:
    """The prompt settings that training recorded for this artifact (system prompt, template hash, stop tokens)."""
    if spec.kind == "endpoint" or not spec.path:
        return {}
    p = Path(spec.path)
    rec_path = p / RECORD if p.is_dir() else p.parent / RECORD
    if not rec_path.exists():
        return {}
    rec = read_record(p)
    if rec.get("kind") == "base":
        return {}
    return {
        k: rec[k] for k in ("system_prompt", "chat_template_sha256", "stop_tokens") if rec.get(k) is not None
    }


def identity(spec: ModelSpec) -> dict:
    """What was evaluated, precisely enough to compare two evals."""
    ident: dict = {"spec": spec.spec, "kind": spec.kind}
    if spec.registry_ref:
        ident["registry_ref"] = spec.registry_ref
    if spec.kind == "hf":
        ident.update({k: v for k, v in spec.identity.items() if k != "spec"})
    elif spec.kind == "adapter":
        ident["path"] = str(Path(spec.path).resolve())
        ident["sha256"] = sha256_dir(spec.path)
        ident["base"] = identity(spec.base)
    elif spec.kind == "gguf":
        ident["path"] = str(Path(spec.path).resolve())
        ident["sha256"] = sha256_file(spec.path)
    elif spec.kind == "endpoint":
        ident.update({"url": spec.url, "model": spec.model_name})
    return ident


def weights_bytes(path: str | None) -> int | None:
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    return None  # a Hub id: its files live in the HF cache


class MemoryWatch:
    """Samples this process's resident memory in a thread; `peak` is the highest seen while it ran."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.start_rss = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:  # psutil missing: fall back to the process-wide peak
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class Engine(abc.ABC):
    """One way of running a model; subclasses implement `load` and `generate`."""

    kind = "?"

    def __init__(self, spec: ModelSpec, opts: EngineOptions):
        self.spec = spec
        self.opts = opts
        self.template: dict = {"chat_template_sha256": None, "stop_tokens": None}
        self.footprint: dict = {}

    def check(self) -> None:  # noqa: B027 (optional hook; most engines have nothing to check)
        """Cheap checks before any model is loaded (an endpoint is reachable, ...)."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model (and record its template and footprint)."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[dict]], desc: str = "") -> list[Generation]:
        """Greedy answers for `prompts`, in order."""

    def close(self) -> None:
        gc.collect()

    def run(
        self, prompts: list[list[dict]], desc: str, after_load: Callable[[dict], None] | None = None
    ) -> EngineResult:
        """Load, answer every prompt, measure, and free the model. `after_load(template)` runs before any
        generation, so a template check can stop the run early."""
        with MemoryWatch() as mem:
            t0 = time.perf_counter()
            self.load()
            load_s = time.perf_counter() - t0
            try:
                if after_load is not None:
                    after_load(dict(self.template))
                outputs = self.generate(prompts, desc=desc)
                cuda_peak = self._cuda_peak()
            finally:
                self.close()
        footprint = {
            "file_bytes": weights_bytes(self.spec.path),
            "peak_rss_bytes": mem.peak if self.kind != "endpoint" else None,
            "rss_delta_bytes": mem.peak - mem.start_rss if self.kind != "endpoint" else None,
            "cuda_peak_bytes": cuda_peak,
            "load_s": round(load_s, 3),
            **self.footprint,
        }
        return EngineResult(outputs, dict(self.template), footprint, identity(self.spec), self.kind)

    def _cuda_peak(self) -> int | None:
        return None


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise TuneshipError("device=cuda but no CUDA GPU is visible; use --set device=cpu")
    return choice


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()


class HFEngine(Engine):
    """An HF causal LM, or an adapter applied with PEFT to a freshly loaded base (never a shared object)."""

    kind = "hf"

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tuneship.models import chat_template_info

        torch.set_num_threads(self.opts.threads or os.cpu_count() or 1)
        self.device = _device(self.opts.device)
        dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        adapter = self.spec.kind == "adapter"
        base_path = self.spec.base.path if adapter else self.spec.path
        # Training saves the tokenizer (with the chat template it used) next to the adapter; prefer it.
        tok_path = self.spec.path if adapter and _has_tokenizer(Path(self.spec.path)) else base_path
        try:
            tok = AutoTokenizer.from_pretrained(tok_path, padding_side="left", trust_remote_code=False)
        except OSError as e:
            raise TuneshipError(f"cannot load the tokenizer of {tok_path}: {_first_line(e)}") from None
        if self.opts.chat_template is not None:
            tok.chat_template = self.opts.chat_template
        if not tok.chat_template:
            raise TuneshipError(
                f"{tok_path} has no chat template; pass one with --set chat_template=FILE.jinja"
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tok = tok
        self.template = chat_template_info(tok)
        vocab = tok.get_vocab()
        stop_tokens = list(dict.fromkeys([*self.template["stop_tokens"], *self.opts.stop_tokens]))
        self.stop_ids = sorted({vocab[t] for t in stop_tokens if t in vocab})
        if tok.eos_token_id is not None and tok.eos_token_id not in self.stop_ids:
            self.stop_ids.append(tok.eos_token_id)

        use_st = None if self.opts.allow_pickle else True
        try:
            model = AutoModelForCausalLM.from_pretrained(
                base_path, dtype=dtype, trust_remote_code=False, use_safetensors=use_st
            )
        except OSError as e:
            raise TuneshipError(f"cannot load the model {base_path}: {_first_line(e)}") from None
        if adapter:
            from peft import PeftModel

            # A fresh base owned by this engine: merging into it cannot leak into another model.
            model = PeftModel.from_pretrained(model, self.spec.path).merge_and_unload()
            adapter_bytes, base_bytes = weights_bytes(self.spec.path), weights_bytes(base_path)
            self.footprint["adapter_bytes"] = adapter_bytes
            self.footprint["file_bytes"] = (
                (adapter_bytes or 0) + base_bytes if base_bytes is not None else None
            )
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model = model.to(self.device).eval()

    def generate(self, prompts: list[list[dict]], desc: str = "") -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        tok = self.tok
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # similar lengths together: less padding
        gen_cfg = GenerationConfig(
            max_new_tokens=self.opts.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=tok.pad_token_id,
        )
        results: list[Generation | None] = [None] * len(texts)
        stops = set(self.stop_ids)
        bs = self.opts.batch_size
        with bar(total=len(texts), desc=desc, unit="ex") as pbar, torch.inference_mode():
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                enc = tok(
                    [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                t0 = time.perf_counter()
                out = self.model.generate(**enc, generation_config=gen_cfg)
                dt = time.perf_counter() - t0
                new = out[:, enc["input_ids"].shape[1] :].tolist()
                for row, i in zip(new, idx, strict=True):
                    end = next((j for j, t in enumerate(row) if t in stops), None)
                    n_tok = len(row) if end is None else end + 1  # the stop token was generated too
                    text = tok.decode(row[:end] if end is not None else row, skip_special_tokens=True)
                    results[i] = Generation(text.strip(), n_tok, dt / len(idx))
                pbar.update(len(idx))
        return [r for r in results if r is not None]

    def _cuda_peak(self) -> int | None:
        if getattr(self, "device", "cpu") != "cuda":
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())

    def close(self) -> None:
        self.model = None
        self.tok = None
        gc.collect()
        if getattr(self, "device", "cpu") == "cuda":
            import torch

            torch.cuda.empty_cache()


class GGUFEngine(Engine):
    """A GGUF file through llama.cpp; the chat template is the one embedded in the file."""

    kind = "gguf"

    def load(self) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise TuneshipError(f"GGUF models need llama-cpp-python ({e}); run `make setup`") from None
        gpu = self.opts.device == "cuda" or (self.opts.device == "auto" and _cuda_available())
        try:
            self.llm = Llama(
                model_path=self.spec.path,
                n_ctx=self.opts.n_ctx,
                n_threads=self.opts.threads or os.cpu_count() or 1,
                n_gpu_layers=-1 if gpu else 0,
                seed=self.opts.seed,
                verbose=False,
            )
        except ValueError as e:
            raise TuneshipError(
                f"llama.cpp cannot load {self.spec.path} ({_first_line(e)}); is it a complete GGUF file?"
            ) from None
        md = self.llm.metadata or {}
        template = md.get("tokenizer.chat_template")
        # The same rule as tuneship.models.chat_template_info, so HF and GGUF stop lists compare: the known
        # end-of-turn tokens that are single tokens of this vocabulary, then EOS.
        stops = [
            t for t in STOP_CANDIDATES if len(self.llm.tokenize(t.encode(), add_bos=False, special=True)) == 1
        ]
        if md.get("tokenizer.ggml.eos_token_id") is not None:
            eos = int(md["tokenizer.ggml.eos_token_id"])
            text = self.llm.detokenize([eos], special=True).decode("utf-8", errors="replace")
            if text and text not in stops:
                stops.append(text)
        self.template = {
            "chat_template_sha256": sha256_bytes(template) if template else None,
            "stop_tokens": stops,
        }

    def generate(self, prompts: list[list[dict]], desc: str = "") -> list[Generation]:
        results = []
        for messages in bar(prompts, desc=desc, unit="ex"):
            t0 = time.perf_counter()
            resp = self.llm.create_chat_completion(
                messages=messages,
                temperature=0.0,
                top_k=1,
                repeat_penalty=1.0,
                max_tokens=self.opts.max_new_tokens,
                seed=self.opts.seed,
            )
            dt = time.perf_counter() - t0
            text = resp["choices"][0]["message"].get("content") or ""
            results.append(Generation(text.strip(), int(resp["usage"]["completion_tokens"]), dt))
        return results

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
        self.llm = None
        gc.collect()


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class EndpointEngine(Engine):
    """An OpenAI-compatible chat completions server. Requests are sent one at a time, so each latency is the
    server's own time for that example, not time spent queued behind the others."""

    kind = "endpoint"

    def _client(self):
        import httpx

        timeout = httpx.Timeout(self.opts.timeout_s, connect=min(5.0, self.opts.timeout_s))
        return httpx.Client(base_url=self.spec.url, timeout=timeout)

    def _unreachable(self, err: Exception) -> TuneshipError:
        reason = type(err).__name__ + (f": {err}" if str(err) else "")
        return TuneshipError(
            f"endpoint {self.spec.url} cannot be reached ({reason}); start the server or fix the URL "
            "(written http://host:port/v1#model-name)"
        )

    def check(self) -> None:
        import httpx

        with self._client() as client:
            try:
                client.get("/models")  # any HTTP answer will do: the server is up
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                raise self._unreachable(e) from None
            except httpx.TimeoutException:
                raise self._no_answer() from None
            except httpx.TransportError as e:
                raise self._unreachable(e) from None

    def _no_answer(self) -> TuneshipError:
        return TuneshipError(
            f"endpoint {self.spec.url} did not answer within {self.opts.timeout_s:g} s; "
            "raise timeout_s (--set timeout_s=...) or check the server"
        )

    def load(self) -> None:
        self.client = self._client()

    def generate(self, prompts: list[list[dict]], desc: str = "") -> list[Generation]:
        import httpx

        results = []
        for messages in bar(prompts, desc=desc, unit="ex"):
            body = {
                "model": self.spec.model_name,
                "messages": messages,
                "temperature": 0.0,
                "max_tokens": self.opts.max_new_tokens,
                "seed": self.opts.seed,
            }
            t0 = time.perf_counter()
            try:
                resp = self.client.post("/chat/completions", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                raise self._unreachable(e) from None
            except httpx.TimeoutException:
                raise self._no_answer() from None
            except httpx.TransportError as e:
                raise self._unreachable(e) from None
            dt = time.perf_counter() - t0
            if resp.status_code >= 400:
                raise TuneshipError(
                    f"endpoint {self.spec.url} answered HTTP {resp.status_code} for model "
                    f"{self.spec.model_name!r}: {' '.join(resp.text.split())[:200]}"
                )
            data = resp.json()
            text = data["choices"][0]["message"].get("content") or ""
            usage = data.get("usage") or {}
            results.append(Generation(text.strip(), int(usage.get("completion_tokens") or 0), dt))
        return results

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        self.client = None


def make_engine(spec: ModelSpec, opts: EngineOptions) -> Engine:
    if spec.kind in ("hf", "adapter"):
        return HFEngine(spec, opts)
    if spec.kind == "gguf":
        return GGUFEngine(spec, opts)
    if spec.kind == "endpoint":
        return EndpointEngine(spec, opts)
    raise TuneshipError(f"cannot evaluate a model of kind {spec.kind!r}")
