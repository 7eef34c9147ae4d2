"""llama.cpp's own converter and quantizer, at the revision of the installed llama-cpp-python runtime.

llama-cpp-python is a source distribution that vendors the llama.cpp it builds. Its sdist therefore holds the
exact `convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py/`) that matches the runtime we load
GGUFs with. `fetch()` (run by `make setup` as `python -m tuneship.export.llamacpp fetch`) downloads that sdist
once with pip and extracts just those pieces; the export stage then runs the converter as a subprocess and
never touches the network. The converter puts its vendored `gguf-py` first on sys.path itself, so it always
uses the gguf writer of its own revision, not the `gguf` package installed in the venv.

Quantization goes through the runtime's C API (`llama_model_quantize`), so no llama.cpp binaries are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata as md
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tuneship.errors import TuneshipError

DIST = "llama-cpp-python"
# What the converter needs, relative to vendor/llama.cpp/ in the sdist. The two vocab files and the templates
# are read by a few converter classes (builtin vocabularies, RWKV); they are small.
PIECES = (
    "convert_hf_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "models/templates/",
    "models/ggml-vocab-gpt-neox.gguf",
    "models/ggml-vocab-llama-spm.gguf",
    "LICENSE",
)
MARKER = "tuneship-llamacpp.json"
CONVERTER = "convert_hf_to_gguf.py"


def runtime_version() -> str:
    try:
        return md.version(DIST)
    except md.PackageNotFoundError as e:
        raise TuneshipError(f"{DIST} is not installed; run `make setup`") from e


def tools_dir(version: str | None = None) -> Path:
    """Where the converter lives: $TUNESHIP_LLAMACPP_DIR, else <venv>/share/tuneship/llama.cpp-<version>."""
    env = os.environ.get("TUNESHIP_LLAMACPP_DIR")
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "tuneship" / f"llama.cpp-{version or runtime_version()}"


def is_complete(directory: Path, version: str) -> bool:
    marker = directory / MARKER
    if not (marker.exists() and (directory / CONVERTER).exists()):
        return False
    try:
        return json.loads(marker.read_text()).get("version") == version
    except (OSError, json.JSONDecodeError):
        return False


def converter_path() -> Path:
    """The converter script matching the installed runtime; a one-line error when `make setup` has not run."""
    version = runtime_version()
    directory = tools_dir(version)
    if not is_complete(directory, version):
        raise TuneshipError(
            f"llama.cpp's converter for {DIST} {version} is missing from {directory}; run `make setup` "
            "(or `python -m tuneship.export.llamacpp fetch`)"
        )
    return directory / CONVERTER


def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += [f"{DIST}=={version}", "-d", str(dest), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz")) + sorted(dest.glob("llama-cpp-python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        raise TuneshipError(f"could not download the {DIST}=={version} source distribution: {last}")
    return found[0]


def _extract(sdist: Path, version: str, target: Path) -> None:
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/REST
                if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                    continue
                rest = parts[3]
                if not any(rest == p or (p.endswith("/") and rest.startswith(p)) for p in PIECES):
                    continue
                if not (m.isfile() or m.isdir()):
                    continue
                m.name = rest
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / CONVERTER).exists() or not (tmp / "gguf-py" / "gguf").is_dir():
            raise TuneshipError(f"{sdist.name} does not hold vendor/llama.cpp/{CONVERTER} and gguf-py")
        (tmp / MARKER).write_text(
            json.dumps({"dist": DIST, "version": version, "sdist": sdist.name}, indent=2) + "\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch(directory: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None) -> dict:
    """Make sure the converter for the installed runtime is in place. Idempotent; quick when already done.

    `sdist` is an already-downloaded llama-cpp-python source archive (for offline machines); otherwise pip
    downloads it (from PyPI or whatever index pip is configured with).
    """
    version = runtime_version()
    target = Path(directory) if directory else tools_dir(version)
    if is_complete(target, version):
        return {"dir": str(target), "version": version, "fetched": False}
    target.parent.mkdir(parents=True, exist_ok=True)
    if sdist:
        _extract(Path(sdist), version, target)
    else:
        with tempfile.TemporaryDirectory(prefix="tuneship-llamacpp-") as tmp:
            _extract(_download_sdist(version, Path(tmp)), version, target)
    return {"dir": str(target), "version": version, "fetched": True}


class ConvertError(TuneshipError):
    pass


def convert(model_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on a local HF checkpoint. One-line errors for the known failures."""
    script = converter_path()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py vendored beside the converter: same revision
    model_dir, outfile = (
        Path(model_dir).resolve(),
        Path(outfile).resolve(),
    )  # the converter runs in its own dir
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(script.parent))
    if proc.returncode == 0 and outfile.exists():
        return
    text = proc.stderr + proc.stdout
    m = re.search(r"Model (\S+) is not supported", text)
    if m:
        raise ConvertError(
            f"llama.cpp cannot convert architecture {m.group(1)} (from {model_dir}/config.json); "
            f"see `python {script} --print-supported-models` for the ones it can"
        )
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    tail = lines[-1] if lines else f"exit status {proc.returncode}"
    raise ConvertError(f"llama.cpp's converter failed on {model_dir}: {tail}")


def ftype_names() -> list[str]:
    import llama_cpp

    names = [
        n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")
    ]
    return sorted(names)


def ftype(name: str) -> int:
    """llama.cpp's file type constant for a quant name such as Q4_K_M, q8_0 or F16."""
    import llama_cpp

    key = name.strip().upper()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key}", None)
    if value is None:
        raise TuneshipError(f"unknown quant type {name!r}; llama.cpp knows: {', '.join(ftype_names())}")
    return int(value)


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> dict:
    """Quantize a GGUF through llama.cpp's C API (llama_model_quantize), as the llama-quantize tool does.

    llama.cpp prints a line per tensor that needs a fallback type (for example when a row length is not a
    multiple of 256 for K-quants); that output is captured and summarized instead of flooding the terminal.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(quant)
    params.nthread = threads or (os.cpu_count() or 1)
    # llama.cpp logs either through llama-cpp-python's callback (Python's sys.stderr) or straight to fd 2
    py_err = io.StringIO()
    with tempfile.TemporaryFile() as captured, contextlib.redirect_stderr(py_err):
        sys.__stderr__.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace") + py_err.getvalue()
    if rc != 0 or not dst.exists():
        lines = [ln for ln in text.splitlines() if ln.strip()]
        raise TuneshipError(
            f"llama.cpp failed to quantize {src.name} to {quant} (status {rc}): {lines[-1] if lines else ''}"
        )
    m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", text)
    return {"fallback_tensors": int(m.group(1)) if m else 0, "tensors": int(m.group(2)) if m else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuneship.export.llamacpp", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser(
        "fetch", help="Extract llama.cpp's converter for the installed llama-cpp-python (idempotent)."
    )
    f.add_argument(
        "--dir", help="Target directory (default: $TUNESHIP_LLAMACPP_DIR or <venv>/share/tuneship/...)."
    )
    f.add_argument("--sdist", help="Use this llama-cpp-python .tar.gz instead of downloading it.")
    sub.add_parser("where", help="Print the converter directory for the installed runtime.")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            result = fetch(args.dir, args.sdist)
            state = "fetched" if result["fetched"] else "already present"
            print(
                f"llama.cpp converter for {DIST} {result['version']}: {state} in {result['dir']}",
                file=sys.stderr,
            )
        else:
            print(tools_dir())
    except TuneshipError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
