import pytest

from relay.edge.auth import KeyRing, find_key, hash_key, offered_subprotocols
from relay.edge.routes import parse_realtime_request, resolve_deployment
from relay.errors import ClientRefused
from relay.ops.config import CredentialConfig, DeploymentConfig, TeamConfig

TEAM_A = TeamConfig("a", (hash_key("key-a"), hash_key("key-a2")), ("gpt-realtime",))
TEAM_B = TeamConfig("b", (hash_key("key-b"),), ("gpt-realtime", "mini"))
CRED = CredentialConfig()
DEPLOYMENTS = {
    "gpt-realtime": DeploymentConfig("gpt-realtime", "https://r.openai.azure.com", CRED),
    "mini": DeploymentConfig("mini", "https://r.openai.azure.com", CRED),
    "old": DeploymentConfig("old", "https://r.openai.azure.com", CRED, protocol="preview"),
}


def test_hash_is_stable_and_prefixed():
    assert (
        hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize(
    ("headers", "query", "protocols", "expected"),
    [
        ({"api-key": "k1"}, {}, [], "k1"),
        ({"Authorization": "Bearer k2"}, {}, [], "k2"),
        ({"Authorization": "bearer  k2 "}, {}, [], "k2"),
        ({}, {}, ["realtime", "openai-insecure-api-key.k3"], "k3"),
        ({}, {"api-key": "k4"}, [], "k4"),
        ({}, {"Authorization": "Bearer k5"}, [], "k5"),
        ({"Authorization": "Basic abc"}, {}, [], None),
        ({}, {}, ["realtime", "openai-insecure-api-key."], None),
        ({}, {}, [], None),
        ({"api-key": "header"}, {"api-key": "query"}, [], "header"),
    ],
)
def test_find_key(headers, query, protocols, expected):
    assert find_key(headers, query, protocols) == expected


def test_keyring_identifies_teams():
    ring = KeyRing.from_teams([TEAM_A, TEAM_B])
    assert ring.identify("key-a") is TEAM_A
    assert ring.identify("key-a2") is TEAM_A
    assert ring.identify("key-b") is TEAM_B
    assert ring.identify("key-c") is None
    assert ring.identify("") is None


def test_offered_subprotocols():
    assert offered_subprotocols("realtime, openai-insecure-api-key.x ,") == [
        "realtime",
        "openai-insecure-api-key.x",
    ]


def test_deployment_from_model_or_deployment_query():
    assert parse_realtime_request({"model": "m"}, {}, []).deployment == "m"
    assert parse_realtime_request({"deployment": "d", "api-version": "v"}, {}, []).deployment == "d"
    with pytest.raises(ClientRefused) as info:
        parse_realtime_request({}, {}, [])
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("team", "name", "beta", "status"),
    [
        (TEAM_A, "missing", False, 404),
        (TEAM_A, "mini", False, 403),
    ],
)
def test_resolve_deployment_refusals(team, name, beta, status):
    request = parse_realtime_request(
        {"model": name}, {"OpenAI-Beta": "realtime=v1"} if beta else {}, []
    )
    with pytest.raises(ClientRefused) as info:
        resolve_deployment(request, team, DEPLOYMENTS)
    assert info.value.status == status


def test_beta_client_on_a_preview_deployment_is_fine():
    request = parse_realtime_request({"model": "old"}, {}, ["openai-beta.realtime-v1"])
    assert request.dialect == "preview"
    team = TeamConfig("c", TEAM_B.keys, ("old",))
    assert resolve_deployment(request, team, DEPLOYMENTS).name == "old"


def test_beta_client_on_a_ga_deployment_is_admitted_for_translation():
    query = {"deployment": "gpt-realtime", "api-version": "2024-10-01-preview"}
    request = parse_realtime_request(query, {}, [], "/openai/realtime")
    assert request.dialect == "preview"
    assert resolve_deployment(request, TEAM_B, DEPLOYMENTS).name == "gpt-realtime"


def test_client_address_behind_trusted_proxies():
    import ipaddress

    from relay.edge.auth import client_address

    proxies = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")]
    # Not behind a trusted proxy: the peer, whatever the header claims.
    assert client_address("203.0.113.9", ["1.2.3.4"], proxies) == "203.0.113.9"
    # Behind two trusted hops: the rightmost untrusted address (spoofed left parts ignored).
    hops = ["6.6.6.6, 198.51.100.7, 10.1.2.3"]
    assert client_address("127.0.0.1", hops, proxies) == "198.51.100.7"
    # A proxy that adds its own line (HAProxy's option forwardfor): the lines in order, so a
    # line the client sent first is still left of the proxy's.
    assert client_address("127.0.0.1", ["6.6.6.6", "198.51.100.7"], proxies) == "198.51.100.7"
    assert client_address("10.0.0.5", [], proxies) == "10.0.0.5"
    # Not an address: the search ends at the peer (a client must not pick the brake's key).
    assert client_address("10.0.0.5", ["not-an-ip"], proxies) == "10.0.0.5"
    assert client_address("10.0.0.5", ["1.2.3.4, " + "x" * 16_000], proxies) == "10.0.0.5"
    assert client_address("10.0.0.5", ["2001:DB8::1"], proxies) == "2001:db8::1"
    # With the port some gateways add (Azure Application Gateway): the address alone, so
    # clients behind it are not one brake bucket (the gateway's).
    assert client_address("10.0.0.5", ["203.0.113.5:41234"], proxies) == "203.0.113.5"
    assert client_address("10.0.0.5", ["[2001:db8::1]:443"], proxies) == "2001:db8::1"
    assert client_address("10.0.0.5", ["198.51.100.7:5555, 10.1.2.3:80"], proxies) == (
        "198.51.100.7"
    )
    assert client_address(None, [], []) == "unknown"


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"model": "gpt-realtime", "intent": "chat"}, "unsupported_parameter"),
        ({"call_id": ""}, "unsupported_parameter"),
        ({"call_id": "rtc_1", "intent": "transcription"}, "unsupported_parameter"),
        ({"intent": "transcription"}, "missing_deployment"),
    ],
)
def test_intent_and_call_id_are_checked(query, code):
    with pytest.raises(ClientRefused) as info:
        parse_realtime_request(query, {}, [])
    assert (info.value.status, info.value.code) == (400, code)


def test_intent_and_call_id_are_read():
    wanted = parse_realtime_request({"model": "t", "intent": "transcription"}, {}, [])
    assert wanted.transcription and wanted.deployment == "t"
    assert parse_realtime_request({"call_id": "rtc_1"}, {}, []).call_id == "rtc_1"
    transcribe = DeploymentConfig("t", "https://r", CRED, kind="transcription")
    team = TeamConfig("a", (hash_key("k"),), ("t", "gpt-realtime"))
    both = {"t": transcribe, **DEPLOYMENTS}
    assert resolve_deployment(wanted, team, both) is transcribe
    for name, transcription in (("t", False), ("gpt-realtime", True)):
        with pytest.raises(ClientRefused) as info:
            resolve_deployment(
                parse_realtime_request(
                    {"model": name, **({"intent": "transcription"} if transcription else {})},
                    {},
                    [],
                ),
                team,
                both,
            )
        assert info.value.code == "intent_mismatch"


def test_a_transcription_session_is_not_translated():
    transcribe = DeploymentConfig("t", "https://r", CRED, kind="transcription")
    team = TeamConfig("a", (hash_key("k"),), ("t",))
    wanted = parse_realtime_request(
        {"model": "t", "intent": "transcription"}, {"OpenAI-Beta": "realtime=v1"}, []
    )
    assert wanted.dialect == "preview"
    with pytest.raises(ClientRefused) as info:
        resolve_deployment(wanted, team, {"t": transcribe})
    assert info.value.code == "protocol_mismatch"
