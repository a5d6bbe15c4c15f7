"""Code that runs inside the kernel, kept here as real modules and sent to the kernel as source.

Each module is standard library only (plus `comm`, the kernel's own comm API), because it runs on
whatever interpreter the sandbox image has. `call` builds the code for one call into such a module:
the module is executed in a private namespace, so nothing but an explicitly named result lands in
the user's namespace, and tracebacks name `<cellforge:MODULE>`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from ..errors import UsageError

# Python literals only (they are written with repr): nothing a caller passes can become code.
Literal = str | int | float | bool | None | list[str]


@cache
def source(module: str) -> str:
    """The source of `sandbox/inkernel/<module>.py`."""
    return resources.files(__name__).joinpath(f"{module}.py").read_text(encoding="utf-8")


def call(module: str, function: str, *args: Literal, result: str | None = None) -> str:
    """Kernel code that runs `module.function(*args)`, binding its return value to `result` in the
    user's namespace when a name is given (e.g. for `user_expressions`)."""
    for arg in args:
        if not isinstance(arg, (str, int, float, bool, type(None), list)) or (
            isinstance(arg, list) and not all(isinstance(a, str) for a in arg)
        ):
            raise UsageError(f"inkernel.call: {arg!r} is not a plain literal")
    invocation = f"__cellforge_ns[{function!r}]({', '.join(repr(a) for a in args)})"
    return (
        f"__cellforge_ns = {{'__name__': {'cellforge.' + module!r}}}\n"
        "try:\n"
        f"    exec(compile({source(module)!r}, {f'<cellforge:{module}>'!r}, 'exec'), __cellforge_ns)\n"
        f"    {f'{result} = ' if result else ''}{invocation}\n"
        "finally:\n"
        "    del __cellforge_ns\n"
    )
