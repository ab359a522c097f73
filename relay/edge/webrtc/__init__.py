"""WebRTC clients: client secrets minted through the relay, and SDP calls.

How it works:
- ``POST …/realtime/client_secrets`` takes a relay key. The team's policy shapes the
  session fragment (`effective_session`: defaults under it, locked fields and allow-lists
  checked with the WebSocket path's errors, instructions prefix kept), the lifetime is capped
  at ``webrtc.max_secret_seconds``, and the backend's own ``client_secrets`` endpoint is
  called with the relay's credential, failing over like the WebSocket path. The caller gets
  the service's answer with the relay's deployment name in ``session.model``.
- Each minted secret is remembered by its SHA-256 (`SecretBook`: team, deployment, backend,
  expiry), so ``POST …/realtime/calls`` accepts it as ``Authorization: Bearer ek_…`` and
  forwards the SDP offer, with that same secret, to the backend that minted it. With a relay
  key instead, ``?model=`` names the deployment and the backend's credential is used. The
  answer comes back as it is: status, SDP, ``Location``.
- The relay's credential never reaches the caller; secrets are never logged. The book is
  per process: a secret is known to the relay process that minted it.

Modules: `requests` (pure: what a caller asks, the session, the upstream's answers),
`secret_book` (minted secrets), `access` (keys, secrets, origins, deployments), `forward`
(the upstream, with failover), `handlers` (the aiohttp endpoints and `add_routes`).
"""

from relay.edge.webrtc.handlers import WEBRTC, WebRtc, add_routes
from relay.edge.webrtc.requests import SecretRequest, effective_session, parse_secret_request
from relay.edge.webrtc.secret_book import MintedSecret, SecretBook
from relay.edge.webrtc.sideband import SIDEBAND_PATHS, realtime

__all__ = [
    "WEBRTC",
    "MintedSecret",
    "SecretBook",
    "SecretRequest",
    "SIDEBAND_PATHS",
    "WebRtc",
    "add_routes",
    "realtime",
    "effective_session",
    "parse_secret_request",
]
