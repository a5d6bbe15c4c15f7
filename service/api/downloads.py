"""How a job's files are served: the content type by extension, and headers that keep generated content
from acting in the service's origin.

A report opens in the browser (`text/html`) under a Content-Security-Policy that allows no script, no
network request and no form, in a sandboxed origin: it is generated from a tenant's data and code, so
it is treated as untrusted. Everything else is an attachment; nothing is content-sniffed.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".h5ad": "application/x-hdf5",
    ".zip": "application/zip",
    ".xml": "application/xml",
    ".log": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}
INLINE = frozenset({".html"})
# Inline styles and data: images are what a report uses; scripts, fetches, frames and forms are refused.
HTML_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; " \
              "frame-ancestors 'none'; sandbox"


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def download_headers(name: str) -> dict[str, str]:
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-cache"}
    if Path(name).suffix.lower() in INLINE:
        headers["Content-Security-Policy"] = HTML_POLICY
    return headers


def file_download(path: Path, name: str) -> FileResponse:
    """`path` served as `name`: HTML inline under the policy, anything else as an attachment."""
    inline = Path(name).suffix.lower() in INLINE
    return FileResponse(path, media_type=content_type(name), headers=download_headers(name),
                        filename=Path(name).name, content_disposition_type="inline" if inline else "attachment")
