"""The access log (`--access_log`): one INFO line per request when its call ends, on the
`jaxserve.access` logger, whatever the front:

    INFO ... access_log.py] grpc Generate request=7 status=OK prompt_tokens=12 cached_tokens=0
        output_tokens=64 finish=length e2e=1.234s

status is the call's code (gRPC's name, or the HTTP status for the HTTP API); the token counts
and finish reasons are those of the request's final output, "-" when it never finished (a
cancelled call, a refused request); e2e is from the call's start to its end.
"""

import logging
import time

from jaxserve.outputs import RequestOutput

logger = logging.getLogger("jaxserve.access")


class AccessLog:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def request_done(self, front: str, request_id: str | None, status: str,
                     output: RequestOutput | None, started: float) -> str | None:
        """Logs (and returns) the line for a call that began at `started` (time.monotonic())
        and ended with `status`; output: the request's final output, if it finished."""
        if not self.enabled:
            return None
        e2e = time.monotonic() - started
        if output is not None and output.finished:
            counts = (f"prompt_tokens={len(output.prompt_token_ids)} "
                      f"cached_tokens={output.num_cached_tokens} output_tokens="
                      f"{sum(len(c.token_ids) for c in output.outputs)} finish="
                      f"{','.join(str(c.finish_reason) for c in output.outputs)}")
        else:
            counts = "prompt_tokens=- cached_tokens=- output_tokens=- finish=-"
        line = (f"{front} request={request_id if request_id is not None else '-'} "
                f"status={status} {counts} e2e={e2e:.3f}s")
        logger.info("%s", line)
        return line
