"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (translated from the trained chat template), stop
parameters and SYSTEM.

The trained template is Jinja; Ollama's is a Go text/template over `.Messages`. We detect the template family
from the Jinja text, build the Go template from parts probed out of the Jinja template itself (for example the
default system prompt SmolLM2 inserts when a conversation has none), and then check the translation: the Go
template, rendered by `render_go_template`, must give exactly the tokenizer's `apply_chat_template` text on a
set of sample conversations. A template we cannot translate faithfully is an error, never a guess.
"""

from __future__ import annotations

import re
from pathlib import Path

from tuneship.errors import TuneshipError

SAMPLE_CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who are you?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nThanks."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
]


def template_family(jinja: str | None) -> str:
    """The chat template family, from marker tokens in the Jinja text."""
    if not jinja:
        return "none"
    markers = [
        ("chatml", ("<|im_start|>", "<|im_end|>")),
        ("llama3", ("<|start_header_id|>", "<|eot_id|>")),
        ("gemma", ("<start_of_turn>", "<end_of_turn>")),
        ("phi3", ("<|user|>", "<|end|>")),
        ("mistral", ("[INST]", "[/INST]")),
    ]
    for name, tokens in markers:
        if all(t in jinja for t in tokens):
            return name
    return "unknown"


def _chatml(tokenizer) -> str:
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True
    )
    head = "<|im_start|>system\n"
    parts = []
    if probe.startswith(head):
        default_system = probe[len(head) : probe.index("<|im_end|>")]
        parts.append(
            '{{- if ne (index .Messages 0).Role "system" }}<|im_start|>system\n'
            + default_system
            + "<|im_end|>\n{{ end }}"
        )
    parts.append("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


TRANSLATORS = {"chatml": _chatml}


def go_template(tokenizer) -> tuple[str, str]:
    """(family, Go template) for the tokenizer's chat template; checked against apply_chat_template."""
    family = template_family(tokenizer.chat_template)
    if family not in TRANSLATORS:
        what = "has no chat template" if family == "none" else f"uses a {family} chat template"
        raise TuneshipError(
            f"the model {what}, which tuneship cannot translate into an Ollama TEMPLATE (it can: "
            f"{', '.join(TRANSLATORS)}); pass --no-modelfile to export the GGUF without a Modelfile"
        )
    template = TRANSLATORS[family](tokenizer)
    for conv in SAMPLE_CONVERSATIONS:
        want = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        got = render_go_template(template, conv)
        if got != want:
            raise TuneshipError(
                f"the {family} chat template could not be translated faithfully for Ollama (sample conversation "
                f"renders {got[:60]!r}... vs {want[:60]!r}...); pass --no-modelfile"
            )
    return family, template


def modelfile_text(
    gguf_name: str, template: str, stops: list[str], system: str | None, header: str | None = None
) -> str:
    for label, text in (("TEMPLATE", template), ("SYSTEM", system or "")):
        if '"""' in text or text.endswith('"'):
            raise TuneshipError(
                f'the Modelfile {label} cannot hold three double quotes (""") or end with a double quote; '
                "reword it (for the system prompt: --system TEXT)"
            )
    lines = [f"# {line}" for line in (header or "").splitlines()]
    lines.append(f"FROM ./{gguf_name}")
    lines.append(f'TEMPLATE """{template}"""')
    for stop in stops:
        lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def parse_modelfile(path: str | Path) -> dict:
    """The FROM, TEMPLATE, stop parameters and SYSTEM of a Modelfile we wrote (for checks and tests)."""
    text = Path(path).read_text()
    out: dict = {"from": None, "template": None, "stops": [], "system": None}
    for key, value in re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, flags=re.S | re.M):
        out[key.lower()] = value
    m = re.search(r"^FROM (.+)$", text, flags=re.M)
    out["from"] = m.group(1).strip() if m else None
    out["stops"] = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    return out


# --- a small interpreter for the subset of Go's text/template that Ollama templates use -------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", s), applying `{{-` / `-}}` whitespace trimming."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = template[pos:]
    out.append(("text", text.lstrip() if trim_next else text))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0) -> tuple[list, int, str | None]:
    """Nodes up to a closing `end`/`else`; returns (nodes, next index, the closing keyword)."""
    nodes: list = []
    while i < len(tokens):
        kind, s = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", s))
            continue
        word = s.split(None, 1)[0] if s else ""
        if word in ("end", "else"):
            return nodes, i, word
        if word in ("if", "range"):
            body, i, closer = _parse(tokens, i)
            other: list = []
            if closer == "else":
                other, i, closer = _parse(tokens, i)
            if closer != "end":
                raise ValueError(f"unclosed {{{{ {s} }}}}")
            nodes.append((word, s.split(None, 1)[1], body, other))
        else:
            nodes.append(("expr", s))
    return nodes, i, None


def _split_args(s: str) -> list[str]:
    args, depth, cur, quoted = [], 0, "", False
    for ch in s:
        if ch == '"' and depth == 0:
            quoted = not quoted
        if ch == " " and depth == 0 and not quoted:
            if cur:
                args.append(cur)
            cur = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0) if not quoted else 0
        cur += ch
    if cur:
        args.append(cur)
    return args


def _value(arg: str, dot, root):
    if arg.startswith('"'):
        return arg[1:-1].encode().decode("unicode_escape")
    m = re.fullmatch(r"\((.*)\)((?:\.\w+)*)", arg, re.S)
    if m:
        value = _eval(m.group(1), dot, root)
        for field in filter(None, m.group(2).split(".")):
            value = value[field]
        return value
    if re.fullmatch(r"-?\d+", arg):
        return int(arg)
    if arg.startswith("$"):
        obj, path = root, arg[1:]
    elif arg.startswith("."):
        obj, path = dot, arg
    else:
        raise ValueError(f"unsupported argument {arg!r}")
    for field in filter(None, path.split(".")):
        obj = obj.get(field) if isinstance(obj, dict) else None
    return obj


FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda *xs: all(xs),
    "or": lambda *xs: any(xs),
    "index": lambda xs, i: xs[i],
    "len": lambda xs: len(xs),
}


def _eval(expr: str, dot, root):
    args = _split_args(expr.strip())
    if args[0] in FUNCS:
        return FUNCS[args[0]](*(_value(a, dot, root) for a in args[1:]))
    if len(args) != 1:
        raise ValueError(f"unsupported expression {expr!r}")
    return _value(args[0], dot, root)


def _run(nodes: list, dot, root, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            value = _eval(node[1], dot, root)
            out.append("" if value is None else str(value))
        elif node[0] == "if":
            _run(node[2] if _eval(node[1], dot, root) else node[3], dot, root, out)
        elif node[0] == "range":
            items = _eval(node[1], dot, root) or []
            for item in items:
                _run(node[2], item, root, out)
            if not items:
                _run(node[3], dot, root, out)


def render_go_template(template: str, messages: list[dict], system: str | None = None) -> str:
    """Render an Ollama chat template for `messages` the way Ollama does: messages become `.Messages` with
    `.Role`/`.Content`, and a Modelfile SYSTEM is prepended as a system message when the chat has none.

    Supports the Go text/template subset Ollama templates use: text, `{{- -}}` trimming, if/else/end,
    range/else/end, fields (`.Role`, `$.Messages`, `(index .Messages 0).Role`) and eq/ne/not/and/or/index/len.
    """
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and (not msgs or msgs[0]["Role"] != "system"):
        msgs.insert(0, {"Role": "system", "Content": system})
    root = {"Messages": msgs, "System": system or "", "Prompt": "", "Response": ""}
    nodes, _, closer = _parse(_tokens(template))
    if closer is not None:
        raise ValueError(f"unexpected {{{{ {closer} }}}}")
    out: list[str] = []
    _run(nodes, root, root, out)
    return "".join(out)
