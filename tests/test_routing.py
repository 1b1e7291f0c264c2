"""Routing and cf-aig-* header parsing: pure functions, no proxy."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohere_gateway.addons.headers import (
    api_key_of,
    check_gateway_token,
    check_singletons,
    parse_custom_cost,
    parse_metadata,
    parse_request_options,
)
from cohere_gateway.addons.routing import (
    LocalRoute,
    Route,
    RouteError,
    Upstream,
    check_connect,
    classify_cohere_path,
    route_gateway,
    route_transparent,
)
from cohere_gateway.events import Id


@pytest.mark.parametrize(
    ("target", "path", "api", "endpoint"),
    [
        ("/v1/acc/gw/cohere/v1/chat", "/v1/chat", "v1", "chat"),
        ("/v1/acc/gw/cohere/v1/v1/chat", "/v1/chat", "v1", "chat"),  # SDK with base_url=.../cohere/v1
        ("/v1/acc/gw/cohere/v1/v2/chat", "/v2/chat", "v2", "chat"),  # ClientV2 with base_url=.../cohere/v1
        ("/v1/acc/gw/cohere/v2/embed", "/v2/embed", "v2", "embed"),
        ("/v1/acc/gw/cohere/v1/models/command-r", "/v1/models/command-r", "v1", "models"),
        ("/v1/acc/gw/cohere/compatibility/v1/chat/completions", "/compatibility/v1/chat/completions",
         "compat", "chat.completions"),
    ],
)  # fmt: skip
def test_gateway_route_maps_to_the_cohere_path(target: str, path: str, api: str, endpoint: str) -> None:
    route = route_gateway("POST", target)
    assert isinstance(route, Route)
    assert (route.path, route.api_version, route.endpoint) == (path, api, endpoint)
    assert (route.account_id, route.gateway_id) == ("acc", "gw")


def test_query_string_is_kept_apart_from_the_path() -> None:
    route = route_gateway("GET", "/v1/a/g/cohere/v1/models?page_size=5&endpoint=chat")
    assert isinstance(route, Route)
    assert route.path == "/v1/models" and route.query == "?page_size=5&endpoint=chat"


def test_compat_route_goes_to_the_compatibility_api() -> None:
    route = route_gateway("POST", "/v1/a/g/compat/chat/completions")
    assert isinstance(route, Route)
    assert (route.mode, route.path, route.endpoint) == ("compat", "/compatibility/v1/chat/completions",
                                                        "chat.completions")  # fmt: skip


def test_local_paths_are_not_routes() -> None:
    assert route_gateway("GET", "/healthz") == LocalRoute("/healthz")
    assert route_gateway("GET", "/metrics") == LocalRoute("/metrics")
    with pytest.raises(RouteError) as exc:
        route_gateway("POST", "/metrics")
    assert exc.value.status == 405


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/v1/acc/gw/cohere/v1/..%2Fchat", 400),
        ("/v1/acc/gw/cohere/%2e%2e/v1/chat", 400),
        ("/v1/acc/gw/cohere/../../v1/chat", 400),
        ("/v1/acc/gw/cohere/./v1/chat", 400),
        ("/v1/acc/gw/cohere//v1/chat", 400),
        ("/v1/acc/gw/cohere/v1\\chat", 400),
        ("http://evil.example/v1/acc/gw/cohere/v1/chat", 400),
        ("//evil.example/v1/chat", 400),
        ("/v1/-acc/gw/cohere/v1/chat", 400),
        ("/v1/" + "a" * 65 + "/gw/cohere/v1/chat", 400),
        ("/v1/acc/gw/openai/v1/chat", 404),
        ("/v1/acc/gw/cohere/v3/chat", 404),
        ("/v1/acc/gw/cohere", 404),
        ("/v1/acc/gw/compat/completions", 404),
        ("/v2/chat", 404),
        ("/", 404),
    ],
)
def test_bad_targets_are_refused(target: str, status: int) -> None:
    with pytest.raises(RouteError) as exc:
        route_gateway("POST", target)
    assert exc.value.status == status
    assert exc.value.message


def test_unusual_methods_are_refused() -> None:
    with pytest.raises(RouteError) as exc:
        route_gateway("TRACE", "/v1/a/g/cohere/v1/chat")
    assert exc.value.status == 405


def test_ids_accepted_by_routing_are_valid_event_ids() -> None:
    """The routing check and the contract's Id type must agree, or a routed request could make an
    event the consumer rejects."""

    @given(st.text(alphabet="abcAZ09_.-~!@ ", min_size=0, max_size=70))
    def check(value: str) -> None:
        try:
            route = route_gateway("POST", f"/v1/{value}/g/cohere/v1/chat")
        except RouteError:
            with pytest.raises(msgspec.ValidationError):
                msgspec.convert(value, Id)
            return
        assert isinstance(route, Route)
        assert msgspec.convert(route.account_id, Id) == value

    check()


def test_transparent_only_serves_cohere_hosts() -> None:
    route = route_transparent("POST", "api.cohere.com", 443, "/v2/chat")
    assert (route.mode, route.path, route.api_version) == ("transparent", "/v2/chat", "v2")
    assert route.account_id is None
    for host in ("evil.example", "api.cohere.ai.evil.example", "127.0.0.1"):
        with pytest.raises(RouteError) as exc:
            route_transparent("POST", host, 443, "/v2/chat")
        assert exc.value.status == 403
    check_connect("api.cohere.ai", 443)
    with pytest.raises(RouteError):
        check_connect("api.cohere.ai", 8443)
    with pytest.raises(RouteError):
        check_connect("example.com", 443)


def test_upstream_parsing() -> None:
    up = Upstream.parse("https://api.cohere.ai")
    assert (up.scheme, up.host, up.port, up.prefix, up.host_header) == ("https", "api.cohere.ai", 443, "",
                                                                        "api.cohere.ai")  # fmt: skip
    up = Upstream.parse("http://127.0.0.1:8090/base/")
    assert (up.port, up.prefix, up.host_header) == (8090, "/base", "127.0.0.1:8090")
    for bad in ("ftp://x", "http://user:pw@host", "api.cohere.ai"):
        with pytest.raises(ValueError):
            Upstream.parse(bad)


# --- cf-aig-* headers --------------------------------------------------------------------------------


def test_metadata_accepts_up_to_five_scalars() -> None:
    meta = parse_metadata('{"user": "alice", "team": 7, "beta": true, "score": 0.5, "x": ""}')
    assert meta == {"user": "alice", "team": "7", "beta": "true", "score": "0.5", "x": ""}


@pytest.mark.parametrize(
    "value",
    ["not json", "[1,2]", '{"a": null}', '{"a": {"b": 1}}', '{"a": [1]}', '{"cf.x": 1}',
     '{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6}', '{"": 1}'],
)  # fmt: skip
def test_malformed_metadata_is_a_400_naming_the_header(value: str) -> None:
    with pytest.raises(RouteError) as exc:
        parse_metadata(value)
    assert exc.value.status == 400 and "cf-aig-metadata" in exc.value.message


def test_custom_cost_forms() -> None:
    assert parse_custom_cost('{"per_token_in": 0.000001, "per_token_out": 0.000002}').per_token_out == 2e-6
    assert parse_custom_cost('{"total_cost": 0.5}').total_cost == 0.5
    for bad in ('{"total_cost": -1}', "{}", '{"per_token_in": "1"}', '{"total_cost": 1, "per_token_in": 1}',
                '{"price": 1}', "nope"):  # fmt: skip
        with pytest.raises(RouteError):
            parse_custom_cost(bad)


def test_request_options_from_headers() -> None:
    opts = parse_request_options(
        [
            ("Authorization", "Bearer secret"),
            ("cf-aig-metadata", '{"user": "bob"}'),
            ("CF-AIG-COLLECT-LOG-PAYLOAD", "false"),
            ("cf-aig-event-id", "my-corr-id:42"),
            ("cf-aig-account-id", "team-a"),
            ("cf-aig-cache-ttl", "60"),  # the cache's (addons/cache.py parses it); ignored here
        ]
    )
    assert opts.metadata == {"user": "bob"}
    assert opts.collect_log is True and opts.collect_payload is False
    assert opts.client_event_id == "my-corr-id:42"
    assert opts.account_id == "team-a"
    bads = [("cf-aig-collect-log", "maybe"), ("cf-aig-event-id", "has space"), ("cf-aig-gateway-id", "..")]
    for bad in bads:
        with pytest.raises(RouteError) as exc:
            parse_request_options([bad])
        assert exc.value.status == 400


def test_gateway_token() -> None:
    check_gateway_token(None, ())  # no token configured: open
    check_gateway_token("Bearer s3cret", ("s3cret",))
    check_gateway_token("bearer  s3cret ", ("s3cret",))
    for presented in (None, "", "s3cret", "Bearer wrong", "Token s3cret"):
        with pytest.raises(RouteError) as exc:
            check_gateway_token(presented, ("s3cret",))
        assert exc.value.status == 401


def test_api_key_schemes() -> None:
    assert api_key_of("Bearer k1") == "k1"
    assert api_key_of("Token k2") == "k2"  # Cloudflare's curl example
    assert api_key_of(None, "k3") == "k3"
    assert api_key_of(None) is None


def test_duplicate_singleton_headers_are_refused() -> None:
    check_singletons(["Content-Type", "Accept", "accept", "Authorization"])  # repeats of others are fine
    check_singletons(["cf-aig-metadata", "cf-aig-cache-ttl", "cf-aig-skip-cache"])  # each once: fine
    for name in ("Content-Type", "content-length", "Authorization", "Host", "Transfer-Encoding",
                 "cf-aig-cache-ttl", "CF-AIG-Metadata", "cf-aig-some-future-header"):  # fmt: skip
        with pytest.raises(RouteError, match=f"duplicate {name.lower()} header") as info:
            check_singletons([name, "X-Other", name.upper()])
        assert info.value.status == 400


def test_endpoint_is_the_first_segment_so_ids_never_become_endpoints() -> None:
    assert classify_cohere_path(["v1", "models", "command-r"]) == ("v1", "models")
    assert classify_cohere_path(["v1", "embed-jobs", "job-123", "cancel"]) == ("v1", "embed-jobs")
    assert classify_cohere_path(["v2", "chat"]) == ("v2", "chat")
