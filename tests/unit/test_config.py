from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.ops.config import load_config, masked_config, parse_config
from relay.upstream.backends import build_credentials

HASH = "sha256:" + "a" * 64


def minimal(**server):
    return {
        "server": server,
        "deployments": {
            "gpt-realtime": {
                "endpoint": "https://res.openai.azure.com",
                "credential": {"env": "AZ_KEY"},
            }
        },
        "teams": {"t1": {"keys": [HASH], "deployments": ["gpt-realtime"]}},
    }


def problems(data, overridden=None):
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="relay.toml", overridden=overridden)
    return info.value.problems


def test_minimal_config_gets_defaults():
    config = parse_config(minimal(), source="relay.toml")
    assert config.server.port == 8080
    deployment = config.deployments["gpt-realtime"]
    assert deployment.azure_deployment == "gpt-realtime"
    assert deployment.protocol == "ga"
    assert config.teams["t1"].deployments == ("gpt-realtime",)


def test_every_problem_is_reported_with_source_and_key():
    data = minimal(port="eighty", colour="blue")
    data["teams"]["t1"]["keys"] = ["plain-text-key"]
    data["deployments"]["gpt-realtime"]["protocol"] = "beta"
    found = problems(data)
    assert "relay.toml: server.port: must be an integer, got str 'eighty'" in found
    assert "relay.toml: server.colour: unknown key" in found
    assert any(
        p.startswith("relay.toml: deployments.gpt-realtime.protocol: must be one of") for p in found
    )
    assert any(p.startswith("relay.toml: teams.t1: keys must hold hashes") for p in found)


def test_range_checks_and_required_keys():
    data = minimal(port=70000)
    del data["deployments"]["gpt-realtime"]["credential"]
    found = problems(data)
    assert "relay.toml: server: port must be between 0 and 65535" in found
    assert "relay.toml: deployments.gpt-realtime: needs a credential for its endpoint" in found


def test_team_naming_an_unknown_deployment():
    data = minimal()
    data["teams"]["t1"]["deployments"] = ["nope"]
    assert problems(data) == ["relay.toml: teams.t1.deployments: names unknown deployment 'nope'"]


def test_bad_endpoint():
    data = minimal()
    data["deployments"]["gpt-realtime"]["endpoint"] = "res.openai.azure.com"
    assert "endpoint must be an http(s):// or ws(s):// URL" in problems(data)[0]


def test_env_overrides_follow_the_naming_rule(tmp_path: Path):
    path = tmp_path / "relay.toml"
    path.write_text(
        f"""
[server]
port = 8080
[deployments.gpt-realtime]
endpoint = "https://res.openai.azure.com"
credential = {{ env = "AZ_KEY" }}
[teams.t1]
keys = ["{HASH}"]
deployments = ["gpt-realtime"]
"""
    )
    environ = {
        "RELAY_SERVER__PORT": "9001",
        "RELAY_SERVER__HOST": "0.0.0.0",
        "RELAY_DEPLOYMENTS__GPT_REALTIME__ENDPOINT": "https://other.openai.azure.com",
        "RELAY_LOGGING__LEVEL": "debug",
        "UNRELATED": "x",
    }
    config = load_config(path, environ)
    assert config.server.port == 9001
    assert config.server.host == "0.0.0.0"
    assert config.deployments["gpt-realtime"].endpoint == "https://other.openai.azure.com"
    assert config.logging.level == "debug"


def test_env_override_errors_name_the_variable(tmp_path: Path):
    path = tmp_path / "relay.toml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"RELAY_SERVER__PORT": "many"})
    assert (
        "environment: RELAY_SERVER__PORT: server.port: must be an integer, got str 'many'"
        in info.value.problems
    )


def test_a_misspelt_variable_is_named_as_an_unknown_variable(tmp_path: Path):
    path = tmp_path / "relay.toml"
    path.write_text(_toml(minimal()))
    with pytest.raises(ConfigError) as info:
        load_config(path, {"RELAY_SERVR__PORT": "9000", "RELAY_SERVER__PROT": "9000"})
    assert sorted(info.value.problems) == [
        "environment: RELAY_SERVER__PROT: server.prot: unknown key",
        "environment: RELAY_SERVR__PORT: unknown variable (there is no setting 'servr')",
    ]


def test_level_names_are_case_insensitive(tmp_path: Path):
    path = tmp_path / "relay.toml"
    path.write_text(_toml(minimal()))
    assert load_config(path, {"RELAY_LOGGING__LEVEL": "DEBUG"}).logging.level == "debug"


def test_one_pass_finds_every_problem_in_a_broken_file():
    data = minimal(port=70000, max_message_bytes=0, heartbeat_seconds=-1, listen_backlog=0)
    data["limits"] = {"max_sessions": 0, "auth_block_seconds": 0}
    data["deployments"]["gpt-realtime"]["session"] = {"voice": "alloy"}
    data["deployments"]["gpt-realtime"]["policy"] = {"max_violations": -1}
    data["teams"]["t1"]["deployments"] = ["gpt-realtime", "nope"]
    data["teams"]["t2"] = {"keys": ["plain"], "deployments": ["gone"]}
    found = problems(data)
    assert sorted(found) == sorted(
        [
            "relay.toml: deployments.gpt-realtime.policy: max_violations must be 0 or more",
            "relay.toml: deployments.gpt-realtime: session names voice, not GA session fields "
            "(write defaults and rules in GA names; preview deployments get them translated)",
            "relay.toml: limits: auth_block_seconds must be greater than 0",
            "relay.toml: limits: max_sessions must be greater than 0",
            "relay.toml: server: heartbeat_seconds must be greater than 0",
            "relay.toml: server: listen_backlog must be greater than 0",
            "relay.toml: server: max_message_bytes must be greater than 0",
            "relay.toml: server: port must be between 0 and 65535",
            "relay.toml: teams.t2: keys must hold hashes made by `relay hash-key` or "
            "`relay keys new` (sha256:<64 hex>), never the keys themselves",
            "relay.toml: teams.t1.deployments: names unknown deployment 'nope'",
            "relay.toml: teams.t2.deployments: names unknown deployment 'gone'",
        ]
    )


def test_the_message_buffer_holds_at_least_one_whole_message_or_is_unbounded():
    assert problems(minimal(max_message_bytes=1000, message_buffer_bytes=999)) == [
        "relay.toml: server: message_buffer_bytes must be 0 (no bound) or at least "
        "max_message_bytes (1000)"
    ]
    for fine in (0, 1000):
        data = minimal(max_message_bytes=1000, message_buffer_bytes=fine)
        assert parse_config(data, source="relay.toml").server.message_buffer_bytes == fine


def test_a_teams_message_buffer_holds_at_least_one_whole_message():
    data = minimal(max_message_bytes=1000)
    data["teams"]["t1"]["limits"] = {"message_buffer_bytes": 999}
    assert problems(data) == [
        "relay.toml: teams.t1.limits: message_buffer_bytes must be at least max_message_bytes "
        "(1000)"
    ]
    data["teams"]["t1"]["limits"] = {"message_buffer_bytes": 1000}
    assert parse_config(data, source="relay.toml").teams["t1"].limits.message_buffer_bytes == 1000


def test_item_roles_are_the_ones_items_have():
    data = minimal()
    data["deployments"]["gpt-realtime"]["policy"] = {"allowed_item_roles": ["user", "developer"]}
    assert problems(data) == [
        "relay.toml: deployments.gpt-realtime.policy: allowed_item_roles: unknown roles "
        "['developer'] (items have assistant, system, user)"
    ]


def test_a_simulator_endpoint_needs_no_credential():
    data = minimal()
    data["deployments"]["gpt-realtime"] = {"endpoint": "simulator"}
    config = parse_config(data, source="relay.toml")
    assert build_credentials(config, {}) == {}
    data["deployments"]["gpt-realtime"] = {"endpoint": "https://res.openai.azure.com"}
    assert problems(data) == [
        "relay.toml: deployments.gpt-realtime: needs a credential for its endpoint"
    ]


def _toml(data):
    """Just enough TOML for these tests' dicts (tables of scalars and string lists)."""
    lines = []

    def table(prefix, value):
        scalars = {k: v for k, v in value.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        for key, item in scalars.items():
            lines.append(f"{key} = {_value(item)}")
        for key, item in value.items():
            if isinstance(item, dict):
                table(f"{prefix}.{key}" if prefix else key, item)

    table("", data)
    return "\n".join(lines) + "\n"


def _value(item):
    if isinstance(item, str):
        return f'"{item}"'
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, list):
        return "[" + ", ".join(_value(i) for i in item) + "]"
    return str(item)


def test_unreadable_and_invalid_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, {})


def test_missing_secret_names_the_variable_not_a_value():
    config = parse_config(minimal(), source="relay.toml")
    with pytest.raises(ConfigError) as info:
        build_credentials(config, {})
    assert info.value.problems == [
        "environment: deployments.gpt-realtime.credential: "
        "environment variable AZ_KEY is not set or empty"
    ]
    credentials = build_credentials(config, {"AZ_KEY": "s3cret-azure"})
    assert "s3cret" not in repr(credentials)


def test_masked_config_hides_the_demo_key():
    data = minimal()
    data["simulator"] = {"demo_key": "rk-demo"}
    masked = masked_config(parse_config(data, source="relay.toml"))
    assert masked["simulator"]["demo_key"] == "***"
    credential = masked["deployments"]["gpt-realtime"]["backends"][0]["credential"]
    assert (credential["type"], credential["env"]) == ("api-key", "AZ_KEY")


def test_shipped_configs_are_valid():
    for path in Path("config").glob("*.toml"):
        load_config(path, {})


def test_a_budget_needs_prices_and_prices_are_checked():
    data = minimal()
    data["teams"]["t1"]["limits"] = {"max_usd_per_day": 10, "live_sessions_over_budget": "later"}
    found = problems(data)
    assert any("live_sessions_over_budget: must be one of 'end', 'finish'" in p for p in found)
    data["teams"]["t1"]["limits"]["live_sessions_over_budget"] = "finish"
    assert problems(data) == [
        "relay.toml: teams.t1.limits: a budget needs prices: deployment 'gpt-realtime' has no "
        "[deployments.gpt-realtime.prices]"
    ]
    data["deployments"]["gpt-realtime"]["prices"] = {"output_audio": -1, "output_txt": 2}
    found = problems(data)
    assert "relay.toml: deployments.gpt-realtime.prices.output_txt: unknown key" in found
    data["deployments"]["gpt-realtime"]["prices"] = {"output_audio": 64}
    config = parse_config(data, source="relay.toml")
    assert config.deployments["gpt-realtime"].prices.output_audio == 64.0
    assert config.teams["t1"].limits.max_usd_per_day == 10.0


def test_a_transcription_deployment_takes_transcription_fields_only():
    data = minimal()
    deployment = data["deployments"]["gpt-realtime"]
    deployment["kind"] = "transcription"
    deployment["webrtc"] = {"observe": True}
    deployment["session"] = {"audio": {"input": {"transcription": {"language": "en"}}}}
    config = parse_config(data, source="relay.toml")
    assert config.deployments["gpt-realtime"].kind == "transcription"
    assert config.deployments["gpt-realtime"].webrtc.observe
    deployment["session"] = {"instructions": "x", "audio": {"output": {"voice": "alloy"}}}
    deployment["policy"] = {"locked": ["audio.output.voice"]}
    found = problems(data)
    assert any("instructions, audio.output, not fields of a transcription" in p for p in found)
    deployment["session"] = {}
    found = problems(data)
    assert any("audio.output.voice: a transcription session has" in p for p in found)


def test_on_violation_is_rewrite_or_refuse():
    data = minimal()
    data["deployments"]["gpt-realtime"]["policy"] = {"on_violation": "ignore"}
    [problem] = problems(data)
    assert problem.startswith("relay.toml: deployments.gpt-realtime.policy.on_violation: must be")
    data["deployments"]["gpt-realtime"]["policy"] = {"on_violation": "refuse"}
    config = parse_config(data, source="relay.toml")
    assert config.deployments["gpt-realtime"].policy.on_violation == "refuse"
