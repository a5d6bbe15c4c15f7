"""Runs in the kernel: a subprocess whose stdout and stderr are relayed to the kernel's as they come.

One thread, a selector, and incremental UTF-8 decoding, so a multi-byte character split across two
reads survives. An interrupt (the execution's timeout) kills the process before it propagates.
"""

import codecs
import os
import selectors
import subprocess
import sys


def run(argv, cwd):
    """Run `argv` in `cwd` with no stdin; returns its exit code."""
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relays = {
        proc.stdout.fileno(): (sys.stdout, codecs.getincrementaldecoder("utf-8")("replace")),
        proc.stderr.fileno(): (sys.stderr, codecs.getincrementaldecoder("utf-8")("replace")),
    }
    selector = selectors.DefaultSelector()
    for fd in relays:
        selector.register(fd, selectors.EVENT_READ)
    try:
        while selector.get_map():
            for key, _ in selector.select():
                stream, decoder = relays[key.fd]
                chunk = os.read(key.fd, 65536)
                stream.write(decoder.decode(chunk, final=not chunk))
                if not chunk:
                    selector.unregister(key.fd)
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
        sys.stdout.flush()
        sys.stderr.flush()
