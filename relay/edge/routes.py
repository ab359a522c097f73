"""Which deployment a client asks for, from the URL it connects to. Pure.

Every client path reaches the deployment's own upstream: the path only says how the client
names the deployment. The dialect the client speaks comes from the path, api-version and
beta header or subprotocol (`relay.session.dialect.client_dialect`); a deployment of the
other dialect gets its events translated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from relay.errors import ClientRefused, RequestRejected
from relay.ops.config import DeploymentConfig, TeamConfig
from relay.session.dialect import Dialect, client_dialect

# Azure GA, Azure preview, and OpenAI-style paths.
REALTIME_PATHS = ("/openai/v1/realtime", "/openai/realtime", "/v1/realtime")
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"


@dataclass(frozen=True, slots=True)
class RealtimeRequest:
    deployment: str
    # The dialect the client speaks.
    dialect: Dialect = "ga"
    # `intent=transcription`: a transcription-only session.
    transcription: bool = False
    # `call_id=…`: the sideband socket of a WebRTC call the relay placed.
    call_id: str | None = None


def parse_realtime_request(
    query: Mapping[str, str],
    headers: Mapping[str, str],
    subprotocols: Iterable[str],
    path: str = "/openai/v1/realtime",
) -> RealtimeRequest:
    wants_beta = "realtime=v1" in headers.get("OpenAI-Beta", "").replace(" ", "") or (
        BETA_SUBPROTOCOL in subprotocols
    )
    dialect = client_dialect(path, query.get("api-version"), wants_beta)
    intent = query.get("intent")
    if intent is not None and intent != "transcription":
        raise RequestRejected(
            "unsupported_parameter",
            f"intent={intent!r} is not supported; the only intent is 'transcription'.",
            "intent",
        )
    call_id = query.get("call_id")
    if call_id is not None:
        if not call_id or intent is not None:
            raise RequestRejected(
                "unsupported_parameter",
                "call_id names a call; it takes no intent and must not be empty.",
                "call_id",
            )
        return RealtimeRequest("", dialect, call_id=call_id)
    deployment = query.get("model") or query.get("deployment")
    if not deployment:
        raise ClientRefused(
            400,
            "missing_deployment",
            "Name the deployment with the `model` query parameter "
            "(or `deployment` on the /openai/realtime path).",
        )
    return RealtimeRequest(deployment, dialect, transcription=intent is not None)


def resolve_deployment(
    request: RealtimeRequest, team: TeamConfig, deployments: Mapping[str, DeploymentConfig]
) -> DeploymentConfig:
    """The deployment the team may use, or a refusal that says why not."""
    deployment = deployments.get(request.deployment)
    if deployment is None:
        raise ClientRefused(
            404, "deployment_not_found", f"The deployment {request.deployment!r} does not exist."
        )
    if deployment.name not in team.deployments:
        raise ClientRefused(
            403,
            "deployment_not_allowed",
            f"This key may not use the deployment {deployment.name!r}.",
        )
    transcribing = deployment.kind == "transcription"
    if request.transcription != transcribing:
        raise RequestRejected(
            "intent_mismatch",
            f"The deployment {deployment.name!r} serves transcription sessions: connect with "
            "intent=transcription."
            if transcribing
            else f"The deployment {deployment.name!r} does not serve transcription sessions; "
            "connect without intent=transcription.",
            "intent",
        )
    if request.transcription and request.dialect != deployment.protocol:
        # Translation covers realtime sessions; transcription sessions are not translated.
        raise ClientRefused(
            400,
            "protocol_mismatch",
            f"The transcription deployment {deployment.name!r} speaks the "
            f"{deployment.protocol} realtime protocol; connect in that dialect.",
        )
    return deployment
