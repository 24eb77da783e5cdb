"""The option table (kombu_streams/options.py) and everything derived from it.

Each option is accepted at its default and refused, naming it, for a value of the wrong
type; the Channel's defaults, types and from_transport_options are the table's; the docs'
option reference is generated from it; unknown names are warned about once; and no duration option
turns into 0 ms, which Redis reads as "forever" or "no wait".
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
from celery.app.defaults import NAMESPACES
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import virtual

import kombu_streams  # noqa: F401  (registers redis-streams://)
from kombu_streams import options
from kombu_streams.channel import Channel
from kombu_streams.options import (
    CHANNEL,
    DEFAULTS,
    OPTIONS,
    PASSED_BY_KOMBU,
    POOL_OPTIONS,
    REMOVED_OPTIONS,
    ms,
)
from kombu_streams.poller import MIN_BLOCK

ROOT = Path(__file__).resolve().parent.parent
#: The option reference: rendered from options.rst() when the docs are built.
OPTIONS_PAGE = ROOT / 'docs' / 'reference' / 'options.rst'
#: No server listens here: a Transport is made (and its options checked) without connecting.
NOWHERE = 'redis-streams://127.0.0.1:1/0'
#: The smallest positive float: the least a "positive number of seconds" accepts.
TINY = 5e-324

#: A value of the wrong type for each type the table uses (its first alternative).
WRONG = {'float': 'soon', 'int': '10', 'bool': 'yes', 'str': 5, 'list': '0,3,6,9',
         'dict': [(1, 2)], 'redis.CredentialProvider': 5}


def streams_url(url: str) -> str:
    return 'redis-streams://' + url[len('redis://'):]


def wrong_value(option: options.Option) -> object:
    return WRONG[option.type.split(' | ')[0].split('[')[0]]


def make_transport(transport_options: dict) -> None:
    conn = Connection(NOWHERE, transport_options=transport_options)
    try:
        conn.transport  # noqa: B018  (makes the transport: warnings and checks)
    finally:
        conn.release()


# -- the table and what derives from it ---------------------------------------------------


def test_every_default_passes_its_own_rule() -> None:
    options.check(DEFAULTS)


@pytest.mark.parametrize('option', OPTIONS, ids=lambda o: o.name)
def test_a_wrong_type_is_refused_naming_the_option(option: options.Option) -> None:
    value = wrong_value(option)
    with pytest.raises(ValueError) as info:
        make_transport({option.name: value})
    assert str(info.value) == (f'kombu-streams: transport option {option.name!r} must be '
                               f'{option.rule.allowed}; got {value!r}')


@pytest.mark.redis
def test_every_option_at_its_default_is_accepted(redis_url: str) -> None:
    """All of them at once, given explicitly: the channel opens, without a warning, and has
    the table's values; the pool has the table's defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with Connection(streams_url(redis_url), transport_options=dict(DEFAULTS)) as conn:
            channel = conn.channel()
            for option in OPTIONS:
                if option.component == CHANNEL:
                    assert getattr(channel, option.name) == option.default, option.name
            pool = conn.transport.pool
            assert pool.max_connections == DEFAULTS['max_connections']
            assert (pool.connection_kwargs['health_check_interval']
                    == DEFAULTS['health_check_interval'])
            assert conn.transport.wait_interval <= DEFAULTS['polling_interval']
            channel.close()


def test_the_channel_takes_its_defaults_and_types_from_the_table() -> None:
    """The class attributes Kombu's from_transport_options overrides are the table's
    defaults, and the annotations mypy sees are the table's types."""
    mine = {o.name: o for o in OPTIONS if o.component == CHANNEL}
    annotated = {name for name in Channel.__annotations__ if name in DEFAULTS}
    assert annotated == set(mine)
    for name, option in mine.items():
        assert Channel.__annotations__[name] == option.type, name
        assert getattr(Channel, name) == option.default, name
    names = Channel.from_transport_options
    assert set(names) == set(mine) | set(virtual.Channel.from_transport_options)
    assert len(names) == len(set(names))


def test_the_pool_options_are_the_tables() -> None:
    assert POOL_OPTIONS == tuple(o.name for o in OPTIONS if o.component == options.POOL)
    assert 'max_connections' in POOL_OPTIONS and 'visibility_timeout' not in POOL_OPTIONS


def test_the_docs_render_the_options_from_the_table() -> None:
    """The docs' option list is options.rst() rendered at build time (docs/_ext/ksdocs.py),
    never a copy: a default or a rule written into a page or the README by hand fails here."""
    page = OPTIONS_PAGE.read_text(encoding='utf-8')
    assert page.count('.. kombu-streams-options::') == 1
    for path in [ROOT / 'README.rst', *sorted((ROOT / 'docs').rglob('*.rst'))]:
        text = path.read_text(encoding='utf-8')
        for option in OPTIONS:
            assert f'``{option.name}`` = ``' not in text, (path, option.name)


def test_the_rst_command_prints_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert options.main(['--rst']) == 0
    printed = capsys.readouterr().out
    assert printed == options.rst()
    for option in OPTIONS:
        assert f'``{option.name}`` = ``{option.default!r}``' in printed


# -- warnings ----------------------------------------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the names already warned about in this process."""
    monkeypatch.setattr(options, '_warned', set())


def test_an_unknown_option_is_warned_about_once(fresh_warnings: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(3):
            make_transport({'visibilty_timeout': 10, 'polling_intervall': 1})
    texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(texts) == 2
    first = next(t for t in texts if "'visibilty_timeout'" in t)
    assert 'unknown transport option' in first
    for option in OPTIONS:  # with the list of the known ones
        assert option.name in first
    assert sum("'polling_intervall'" in t for t in texts) == 1


def test_names_kombu_and_celery_pass_are_not_warned_about(fresh_warnings: None) -> None:
    """Producer.publish(retry=True) copies its retry policy, whose keys are the arguments of
    Connection.ensure(), into transport_options; Connection reads its failover settings
    from there. Taken from Kombu's and Celery's own signatures and defaults, so a new key in
    either fails here."""
    ensure = inspect.signature(Connection.ensure).parameters
    retry_keys = set(ensure) - {'self', 'obj', 'fun'}
    celery_policy = set(NAMESPACES['task']['publish_retry_policy'].default)
    assert retry_keys | celery_policy <= PASSED_BY_KOMBU
    given = dict.fromkeys(retry_keys | celery_policy | PASSED_BY_KOMBU, 1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        make_transport(given)


@pytest.mark.redis
def test_a_retrying_publish_leaves_nothing_to_warn_about(redis_url: str,
                                                         fresh_warnings: None) -> None:
    """The real path: publish(retry=True) puts the retry policy into the connection's
    transport_options (Kombu 5.5 and newer; older ones leave them as they were), and a clone
    (Kombu's and Celery's pools clone) makes a transport from them: no warning either way,
    nor for a transport made with those keys directly."""
    queue = Queue('opt-retry', Exchange('opt-retry', type='direct'), routing_key='opt-retry')
    policy = {'max_retries': 2, 'interval_start': 0, 'interval_step': 0.1, 'interval_max': 0.2}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with Connection(streams_url(redis_url)) as conn:
            Producer(conn.default_channel).publish(
                {'n': 1}, exchange=queue.exchange, routing_key='opt-retry', declare=[queue],
                retry=True, retry_policy=policy)
            assert set(conn.transport_options) <= set(policy)
            with conn.clone() as again:
                again.default_channel  # noqa: B018
        with Connection(streams_url(redis_url), transport_options=policy) as direct:
            direct.default_channel  # noqa: B018


@pytest.mark.parametrize('name', sorted(REMOVED_OPTIONS))
def test_a_removed_kombu_option_keeps_its_own_warning(name: str, fresh_warnings: None) -> None:
    with pytest.warns(UserWarning) as caught:
        make_transport({name: 'x'})
    texts = [str(w.message) for w in caught]
    assert texts == [f'kombu-streams ignores transport option {name!r}: '
                     f'{REMOVED_OPTIONS[name]}']


# -- durations in ms ----------------------------------------------------------------------


@pytest.mark.parametrize('seconds,expected', [
    (TINY, 1), (1e-9, 1), (0.0004, 1), (0.001, 1), (0.0011, 2), (1.1, 1100), (0.3, 300),
    (3600, 3_600_000),
])
def test_ms_rounds_up_to_at_least_one(seconds: float, expected: int) -> None:
    assert ms(seconds) == expected


@pytest.mark.redis
def test_the_smallest_durations_never_become_0_ms(redis_url: str) -> None:
    """A lease of 0 ms would take every message as abandoned (XPENDING IDLE 0), WAIT n 0
    blocks for ever and BZPOPMIN 0 waits for ever: the smallest positive values must come
    out as at least 1 ms (10 ms for BZPOPMIN, which rounds smaller timeouts to 0)."""
    with Connection(streams_url(redis_url), transport_options={
            'visibility_timeout': TINY, 'publish_replica_timeout': TINY,
            'publish_min_replicas': 1, 'polling_interval': TINY,
            'routing_cache_ttl': 0, 'delayed_threshold': 0}) as conn:
        channel = conn.channel()
        assert channel.leases.lease_ms == 1
        assert channel._replica_wait() == (1, 1)
        assert conn.transport.cycle._block(None) >= MIN_BLOCK > 0
        channel.close()


@pytest.mark.redis
def test_no_keyprefix_given_as_none_means_no_prefix(redis_url: str) -> None:
    """Kombu's Redis transport takes global_keyprefix=None as no prefix; it was taken as
    the text 'None'."""
    with Connection(streams_url(redis_url),
                    transport_options={'global_keyprefix': None}) as conn:
        channel = conn.channel()
        assert channel.keys.prefix == ''
        assert channel.keys.stream('q', 0).startswith('ks:')
        channel.close()
