"""The program that runs model-written code inside the sandbox; nothing it reports is trusted as a verdict.

`sandbox/process.py` starts it as `python -S -s -c <this file's source> MODE [...]` in the sandbox's working
directory, next to `solution.py`. Only the standard library is used and the syntax stays Python 3.8
compatible, because it runs on whichever interpreter the sandbox user may execute.

- MODE "stdio": run `solution.py` as `__main__` on the inherited stdin/stdout; an uncaught exception
  prints a short traceback to stderr and exits with status 1.
- MODE "call" ENTRY REQUESTS_FD REPLIES_FD MAX_REPLY: load `solution.py` as a module, resolve ENTRY
  ("name" or "Class.method", which calls the method of a fresh `Class()`), then answer calls: one JSON
  line per request on REQUESTS_FD (`{"args": [...], "kwargs": [[name, value], ...]}`), one JSON line per
  reply on REPLIES_FD (`{"ok": value}` or `{"error": traceback}`); the first reply (`{"ok": null}` or an
  error) says whether loading worked. A reply longer than MAX_REPLY bytes is replaced by an error (the
  judge would kill the run). The loop ends when the requests pipe is closed.

Values cross the pipe in the tagged form of `encode` (plain data only: None, bool, int, float, str, list,
tuple, dict, set, frozenset, bytes, complex; exact types, no subclasses), so the judge compares plain data
it decoded itself and never calls a method of an object made by the model's code. `decode` refuses a
set, frozenset or dict with more than MAX_SAME_HASH entries of one hash value: building it would take
time quadratic in their number (a forged reply could stall the judge).
"""

import json
import os
import sys
import traceback

SOLUTION = "solution.py"
MAX_TRACEBACK_CHARS = 1200
MAX_SAME_HASH = 32
_TAGS = ("tuple", "set", "frozenset", "dict", "bytes", "complex")


class UnsupportedValue(TypeError):
    """A value that is not plain data and so cannot be compared outside the sandbox."""


def encode(value):
    """`value` as JSON-ready data; containers other than list become a one-key object naming their type."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v) for v in value]
    if kind is tuple:
        return {"tuple": [encode(v) for v in value]}
    if kind is set or kind is frozenset:
        return {kind.__name__: [encode(v) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise UnsupportedValue("a value of type %s is not plain data" % kind.__name__)


def decode(data):
    """Inverse of `encode`; raises ValueError on anything `encode` cannot produce."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise ValueError("malformed value")
    (tag, body), = data.items()
    if tag not in _TAGS:
        raise ValueError("unknown tag %r" % tag)
    if tag == "bytes":
        if type(body) is not str:
            raise ValueError("malformed bytes")
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError("malformed %s" % tag)
    if tag == "complex":
        if len(body) != 2 or not all(type(x) in (int, float) for x in body):
            raise ValueError("malformed complex")
        return complex(body[0], body[1])
    if tag == "dict":
        if not all(type(p) is list and len(p) == 2 for p in body):
            raise ValueError("malformed dict")
        pairs = [(decode(k), decode(v)) for k, v in body]
        _check_hashes([k for k, _ in pairs])
        return dict(pairs)
    items = [decode(v) for v in body]
    if tag != "tuple":
        _check_hashes(items)
    return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)


def _check_hashes(keys):
    """Refuse keys of which more than MAX_SAME_HASH share one hash value (TypeError if unhashable).
    Counting distinct hash values is itself linear: a hash value is an int that hashes to itself."""
    counts = {}
    for key in keys:
        h = hash(key)
        counts[h] = counts.get(h, 0) + 1
        if counts[h] > MAX_SAME_HASH:
            raise ValueError("more than %d keys with one hash value" % MAX_SAME_HASH)


def short_traceback(exc):
    """The traceback of `exc` limited to frames in the solution, then the error (a syntax error names
    its own line), so the runner's frames never show."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if os.path.basename(f.filename) == SOLUTION]
    lines = ["Traceback (most recent call last):\n"] + traceback.format_list(own) if own else []
    lines += traceback.format_exception_only(type(exc), exc)
    text = "".join(lines)
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


def _load(name):
    with open(SOLUTION, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": name, "__file__": SOLUTION, "__builtins__": __builtins__}
    exec(compile(source, SOLUTION, "exec"), namespace)
    return namespace


def _run_stdio():
    try:
        _load("__main__")
    except SystemExit:
        raise
    except BaseException as exc:
        sys.stdout.flush()
        sys.stderr.write(short_traceback(exc))
        sys.exit(1)


def _resolve(namespace, entry):
    head, _, method = entry.partition(".")
    if head not in namespace:
        raise NameError("the solution does not define %r" % head)
    target = namespace[head]
    return getattr(target(), method) if method else target


def _run_calls(entry, requests_fd, replies_fd, max_reply):
    requests = os.fdopen(requests_fd, "rb")
    replies = os.fdopen(replies_fd, "wb")

    def reply(**message):
        try:
            line = json.dumps(message).encode() + b"\n"
        except ValueError as exc:  # e.g. an int too long for its decimal form
            line = json.dumps({"error": "the return value cannot be sent: %s" % exc}).encode() + b"\n"
        if len(line) > max_reply:
            text = "the return value is too large to send (%d bytes of JSON, at most %d)" % (len(line), max_reply)
            line = json.dumps({"error": text}).encode() + b"\n"
        replies.write(line)
        replies.flush()

    try:
        function = _resolve(_load("solution"), entry)
    except BaseException as exc:  # SystemExit included: loading must finish before any test
        reply(error=short_traceback(exc))
        return
    reply(ok=None)
    for line in requests:
        request = json.loads(line)
        args = decode(request["args"])
        kwargs = {k: decode(v) for k, v in request.get("kwargs", [])}
        try:
            result = encode(function(*args, **kwargs))
        except BaseException as exc:
            reply(error=short_traceback(exc))
            continue
        reply(ok=result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["stdio"]:
        _run_stdio()
    elif sys.argv[1:2] == ["call"] and len(sys.argv) == 6:
        _run_calls(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit("usage: sandbox_runner (stdio | call ENTRY REQUESTS_FD REPLIES_FD MAX_REPLY)")
