"""Which deployment a client asks for, from the URL it connects to. Pure.

Every client path reaches the deployment's own upstream: the path only says how the client
names the deployment. The `openai` SDK's Azure client always uses the preview path while
speaking GA events, so the path is not taken as the client's protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from relay.errors import ClientRefused, RequestRejected
from relay.ops.config import DeploymentConfig, TeamConfig

# Azure GA, Azure preview, and OpenAI-style paths.
REALTIME_PATHS = ("/openai/v1/realtime", "/openai/realtime", "/v1/realtime")
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"


@dataclass(frozen=True, slots=True)
class RealtimeRequest:
    deployment: str
    # The client said it speaks the beta protocol (OpenAI-Beta header or subprotocol).
    wants_beta: bool
    # `intent=transcription`: a transcription-only session.
    transcription: bool = False
    # `call_id=…`: the sideband socket of a WebRTC call the relay placed.
    call_id: str | None = None


def parse_realtime_request(
    query: Mapping[str, str], headers: Mapping[str, str], subprotocols: Iterable[str]
) -> RealtimeRequest:
    wants_beta = "realtime=v1" in headers.get("OpenAI-Beta", "").replace(" ", "") or (
        BETA_SUBPROTOCOL in subprotocols
    )
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
        return RealtimeRequest("", wants_beta, call_id=call_id)
    deployment = query.get("model") or query.get("deployment")
    if not deployment:
        raise ClientRefused(
            400,
            "missing_deployment",
            "Name the deployment with the `model` query parameter "
            "(or `deployment` on the /openai/realtime path).",
        )
    return RealtimeRequest(deployment, wants_beta, transcription=intent is not None)


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
    if request.wants_beta and deployment.protocol == "ga":
        raise ClientRefused(
            400,
            "protocol_mismatch",
            f"The deployment {deployment.name!r} speaks the GA realtime protocol; "
            "connect without the `OpenAI-Beta: realtime=v1` header or beta subprotocol.",
        )
    return deployment
