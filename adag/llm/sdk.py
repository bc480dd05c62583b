"""The OpenAI and Anthropic SDKs' errors (they share names) translated into adag.llm.backend's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from adag.llm.backend import EndpointDown, RequestRejected, TransientError
from adag.llm.roles import UnusableReply


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is not None and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
            return float(value) * scale
    return None


@contextmanager
def sdk_errors(sdk: Any, endpoint: str) -> Iterator[None]:
    """Translate the OpenAI and Anthropic SDKs' errors (they share names) into ours."""
    try:
        yield
    except sdk.APIConnectionError as error:  # refused, reset, timed out
        raise TransientError(str(error)) from error
    except sdk.APIStatusError as error:
        status, message = error.status_code, str(error)[:120]
        if status in (408, 409, 429) or status >= 500:
            raise TransientError(f"HTTP {status} {message}", _retry_after(error.response.headers)) from error
        if status in (401, 403, 404):
            raise EndpointDown(f"{endpoint} refused the request (HTTP {status}: {message}); check the API key "
                               "and the model name") from error
        raise RequestRejected(f"{endpoint} rejected the request (HTTP {status}: {message})") from error
    except (sdk.APIResponseValidationError, json.JSONDecodeError, ValueError) as error:
        raise UnusableReply(f"{endpoint} sent a malformed response ({str(error)[:80]})") from error
