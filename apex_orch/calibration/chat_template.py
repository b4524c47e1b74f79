"""Chat templates from a GGUF's metadata, rendered with bounded time, memory and output.

A model's `tokenizer.chat_template` is a program written by whoever made the file. It runs in
Jinja's sandbox (no attribute or file access), and in a separate worker process so that its
work is bounded for any input:
- time: each conversation must render within TEMPLATE_SECONDS (the parent stops the worker);
- memory: the worker's address space is capped (WORKER_MEMORY_BYTES above its start);
- output: a rendering may be at most max_render_chars(input) characters (checked as it streams).
A template that runs past a bound is an error naming `tokenizer.chat_template`; a template that
raises (e.g. refuses a system role) is a per-conversation refusal the caller falls back on.

Protocol (JSON lines): the parent writes {"template", "bos_token", "eos_token", "now"} then one
{"messages", "tools", "max_chars"} per conversation; the worker answers each with {"ok": text},
{"refused": reason}, {"too_big": chars} or {"memory": reason} (and {"compile_error"} or
{"ready"} once after the first line).
"""

from __future__ import annotations

import json
import os
import selectors
import sys
import time

TEMPLATE_SECONDS = 10.0            # per conversation
WORKER_MEMORY_BYTES = 1 << 30      # address space the worker may add after starting
MAX_TEMPLATE_CHARS = 1 << 20       # the template itself
TEMPLATE_KEY = "tokenizer.chat_template"


def max_render_chars(input_chars: int) -> int:
    """The most characters one conversation may render to: 8x its JSON size plus 64 Ki."""
    return 8 * input_chars + (64 << 10)


# --------------------------------------------------------------------------- worker side

class TemplateRefused(Exception):
    """The chat template raised (e.g. roles it does not accept)."""


def template_env(now_iso: str):
    """A sandboxed Jinja environment that behaves like transformers' chat-template renderer."""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import SandboxedEnvironment

    now = datetime.fromisoformat(now_iso)

    class GenerationTag(Extension):
        # transformers' {% generation %}...{% endgeneration %} marks assistant text; render it as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateRefused(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Same output as transformers' tojson; generators (from map/select filters) become lists.
        if hasattr(value, "__next__"):
            value = list(value)
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: now.strftime(fmt)
    return env


def _cap_memory() -> None:
    try:
        import resource
        with open("/proc/self/statm") as fh:
            vm = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = vm + WORKER_MEMORY_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError, ImportError):  # pragma: no cover - non-Linux: time and output still bounded
        pass


def worker_main() -> None:
    out = sys.stdout

    def send(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    init = json.loads(sys.stdin.readline())
    try:
        compiled = template_env(init["now"]).from_string(init["template"])
    except Exception as exc:  # jinja2.TemplateSyntaxError and friends
        send({"compile_error": str(exc)})
        return
    _cap_memory()
    send({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            parts, total, limit = [], 0, req["max_chars"]
            for chunk in compiled.generate(messages=req["messages"], tools=req["tools"],
                                           add_generation_prompt=False, bos_token=init["bos_token"],
                                           eos_token=init["eos_token"]):
                total += len(chunk)
                if total > limit:
                    break
                parts.append(chunk)
            if total > limit:
                parts = []
                send({"too_big": total})
            else:
                send({"ok": "".join(parts)})
        except MemoryError:
            parts = []
            send({"memory": "the template needed more memory than allowed"})
        except Exception as exc:  # the template refused this conversation
            parts = []
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            send({"refused": reason})


# --------------------------------------------------------------------------- parent side

class TemplateWorker:
    """One worker process for one template; render() one conversation at a time."""

    def __init__(self, template: str, bos_token: str, eos_token: str, now_iso: str, where: str):
        from apex_orch.core.errors import ModelError
        self.where = where
        if len(template) > MAX_TEMPLATE_CHARS:
            raise ModelError(f"{TEMPLATE_KEY} is {len(template):,} characters; at most {MAX_TEMPLATE_CHARS:,}",
                             where=where, hint="chat templates are a few KB; fix the key in the GGUF "
                                               "(gguf-set-metadata) or build the corpus without the model's "
                                               "template (plain format)")
        from apex_orch.llama.tools import start_worker
        self.proc = start_worker([sys.executable, "-m", "apex_orch.calibration.chat_template"])
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._send({"template": template, "bos_token": bos_token, "eos_token": eos_token, "now": now_iso})
        first = self._receive(TEMPLATE_SECONDS, "compiling it")
        if "compile_error" in first:
            self.close()
            raise ModelError(f"the model's chat template does not compile: {first['compile_error']}",
                             where=where, hint="fix tokenizer.chat_template in the GGUF (gguf-set-metadata)")

    def _send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, seconds: float, doing: str) -> dict:
        from apex_orch.core.errors import ModelError
        deadline = time.monotonic() + seconds
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                self.close()
                raise ModelError(f"{TEMPLATE_KEY} ran past {seconds:g} s {doing} and was stopped",
                                 where=self.where, hint="the model's chat template loops without end or is "
                                 "far too slow; fix the key in the GGUF (gguf-set-metadata) or build the "
                                 "corpus without the model's template (plain format)")
            data = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not data:
                self.close()
                raise ModelError(f"{TEMPLATE_KEY}: the sandboxed renderer stopped {doing} "
                                 f"(it needed more than {WORKER_MEMORY_BYTES >> 20} MiB?)", where=self.where,
                                 hint="fix the key in the GGUF (gguf-set-metadata) or build the corpus "
                                      "without the model's template (plain format)")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def render(self, messages: list, tools, origin: str) -> tuple[str | None, str | None]:
        """(text, None) or (None, refusal reason); raises ModelError past a bound."""
        from apex_orch.core.errors import ModelError
        payload = json.dumps({"messages": messages, "tools": tools})
        limit = max_render_chars(len(payload))
        self._send({"messages": messages, "tools": tools, "max_chars": limit})
        reply = self._receive(TEMPLATE_SECONDS, f"rendering the conversation at {origin}")
        if "ok" in reply:
            return reply["ok"], None
        if "refused" in reply:
            return None, reply["refused"]
        self.close()
        if "too_big" in reply:
            raise ModelError(f"{TEMPLATE_KEY} rendered the conversation at {origin} to more than {limit:,} "
                             f"characters (its input is {len(payload):,}) and was stopped", where=self.where,
                             hint="the model's chat template repeats text without bound; fix the key in the "
                                  "GGUF (gguf-set-metadata) or build the corpus without the model's template "
                                  "(plain format)")
        raise ModelError(f"{TEMPLATE_KEY} needed more than {WORKER_MEMORY_BYTES >> 20} MiB rendering the "
                         f"conversation at {origin} and was stopped", where=self.where,
                         hint="fix the key in the GGUF (gguf-set-metadata) or build the corpus without the "
                              "model's template (plain format)")

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self._sel.close()
        except Exception:  # pragma: no cover
            pass


if __name__ == "__main__":
    worker_main()
