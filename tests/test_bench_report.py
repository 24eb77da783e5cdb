"""The arithmetic and the tables of ``scripts/bench`` (``scripts/benchlib/report.py``): the
ceiling, fractions of it, the targets' verdicts and the tables' shape. No broker, no timing:
the samples are made up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / 'scripts' / 'benchlib' / 'report.py'
_spec = importlib.util.spec_from_file_location('bench_report', PATH)
assert _spec and _spec.loader
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

LABELS = {'kombu': 'kombu redis', 'streams': 'kombu-streams', 'raw': 'raw redis-py',
          'alone': 'Kombu alone', 'rabbit': 'RabbitMQ classic',
          'rabbit_confirm': 'RabbitMQ classic+confirms'}


def samples(**rows: dict[str, list]) -> dict:
    return {key: dict(rows.get(key, {})) for key, _, _ in report.ROWS}


def by_key(rows: list[dict]) -> dict[str, dict]:
    return {r['key']: r for r in rows}


def test_ceiling_adds_costs_per_message():
    # 10 us in Kombu + 90 us in redis-py and Redis = 100 us: 10,000 msg/s at the most
    assert report.ceiling(100_000, 1_000_000 / 90) == pytest.approx(10_000)
    assert report.ceiling(50_000, 50_000) == pytest.approx(25_000)
    assert report.ceiling(None, 10_000) is None
    assert report.ceiling(10_000, 0) is None


def test_summarize_medians_ratio_ceiling_and_fractions():
    rows = by_key(report.summarize(samples(
        publish={'kombu': [1000, 3000, 2000], 'streams': [4000, 6000, 5000],
                 'raw': [10_000, 10_000, 10_000], 'alone': [100_000, 90_000, 110_000]},
        lat50={'kombu': [900], 'streams': [400], 'raw': [200]},
        batch={'kombu': [None], 'streams': [7000]},
    )))
    publish = rows['publish']
    assert publish['median'] == {'kombu': 2000, 'streams': 5000, 'raw': 10_000,
                                 'alone': 100_000}
    assert publish['ratio'] == pytest.approx(2.5)
    top = 1 / (1 / 100_000 + 1 / 10_000)
    assert publish['ceiling'] == pytest.approx(top)
    assert publish['fraction'] == {'kombu': pytest.approx(2000 / top),
                                   'streams': pytest.approx(5000 / top)}
    # latency: the ceiling is the raw floor, the fraction floor / latency (1.0 at the floor)
    assert rows['lat50']['ceiling'] == 200
    assert rows['lat50']['fraction'] == {'kombu': pytest.approx(200 / 900),
                                         'streams': pytest.approx(0.5)}
    # a run without a value (batch publish on Kombu: n/a) makes the median n/a, not a number
    assert rows['batch']['median']['kombu'] is None and rows['batch']['ratio'] is None
    # rows without a ceiling get none, even with raw samples
    assert rows['consume1']['ceiling'] is None and rows['consume1']['fraction'] == {}


def test_no_ceiling_without_both_raw_and_alone():
    rows = by_key(report.summarize(samples(
        consume1={'kombu': [1000], 'streams': [2000], 'raw': [8000]})))
    assert rows['consume1']['ceiling'] is None
    assert rows['consume1']['fraction'] == {}


def test_issue20_targets():
    rows = report.summarize(samples(
        publish={'kombu': [1000], 'streams': [9000], 'raw': [20_000], 'alone': [20_000]},
        consume1={'kombu': [1000], 'streams': [8000], 'raw': [20_000], 'alone': [20_000]},
        lat50={'kombu': [900], 'streams': [290], 'raw': [200]},
        prefork={'kombu': [1000], 'streams': [2200], 'rabbit': [2000]},
        threads={'kombu': [1000], 'streams': [2100], 'rabbit': [2000]},
        apply={'kombu': [1000], 'streams': [3000], 'rabbit': [5000],
               'rabbit_confirm': [2900]},
    ))
    targets = {t['name']: t for t in report.check_targets(rows, 20)}
    assert targets['publish, fraction of ceiling']['values'] == [pytest.approx(0.9)]
    assert targets['publish, fraction of ceiling']['met'] is True
    assert targets['consume+ack p1, fraction of ceiling']['met'] is False   # 0.8
    assert targets['consume+ack p100, fraction of ceiling']['values'] == [None]
    assert targets['consume+ack p100, fraction of ceiling']['met'] is False
    assert targets['latency p50 / raw floor']['values'] == [pytest.approx(1.45)]
    assert targets['latency p50 / raw floor']['met'] is True
    drains = targets['Celery drains / RabbitMQ classic']
    assert drains['values'] == [pytest.approx(1.1), pytest.approx(1.05)]
    assert drains['met'] is False   # every row must meet it
    apply = targets['apply_async / RabbitMQ classic+confirms']
    assert apply['values'] == [pytest.approx(3000 / 2900)] and apply['met'] is True
    # issue #5's targets keep the key bench.json always had
    ratio = report.check_targets(rows, 5)[0]
    assert ratio['name'] == 'publish' and ratio['ratios'] == [pytest.approx(9.0)]


def test_main_table_with_ceiling_columns():
    rows = report.summarize(samples(
        publish={'kombu': [3000], 'streams': [7000], 'raw': [13_000], 'alone': [100_000]},
        lat50={'kombu': [900], 'streams': [800], 'raw': [270]},
    ))
    lines = report.main_table(rows, LABELS)
    assert 'fraction of ceiling' in lines[0]
    header = lines[1]
    for title in ('kombu redis', 'kombu-streams', 'ratio', 'raw redis-py', 'Kombu alone',
                  'ceiling', 'kombu', 'streams'):
        assert title in header
    body = lines[3:]
    assert [line.split('|')[0].strip() for line in body] == [
        'publish (msg/s, higher=better)', 'latency p50 (us, lower=better)']  # rows not run: out
    publish = [c.strip() for c in body[0].split('|')]
    assert publish == ['publish (msg/s, higher=better)', '3,000', '7,000', '2.33', '13,000',
                       '100,000', '11,504', '0.26', '0.61']
    latency = [c.strip() for c in body[1].split('|')]
    assert latency == ['latency p50 (us, lower=better)', '900', '800', '0.89', '270', '', '270',
                       '0.30', '0.34']
    # every line's columns line up with the header's
    bars = [i for i, ch in enumerate(header) if ch == '|']
    for line in body:
        assert [i for i, ch in enumerate(line) if ch == '|'] == bars
    # the group title sits over the last two columns, which are widened to hold it
    assert lines[0].index('fraction of ceiling') > bars[-2]
    assert len(lines[0]) <= len(header)


def test_floor_table_sets_the_design_ceiling_beside_the_ceiling():
    """The script floor (one EVALSHA of the least script per message) gives a Lua-script
    design's ceiling, 1 / (1/alone + 1/floor), what fraction of the ceiling such a design can
    reach, and kombu-streams' fraction of it; rows without a floor (or latency) stay out."""
    rows = report.summarize(samples(
        publish={'streams': [6000], 'raw': [10_000], 'floor': [9000], 'alone': [100_000]},
        consume1={'streams': [4000], 'raw': [7500], 'alone': [100_000]},
        lat50={'streams': [500], 'raw': [200], 'floor': [250]},
    ))
    publish = by_key(rows)['publish']
    design = 1 / (1 / 100_000 + 1 / 9000)
    assert publish['design'] == pytest.approx(design)
    assert by_key(rows)['consume1']['design'] is None and by_key(rows)['lat50']['design'] is None
    lines = report.floor_table(rows, {**LABELS, 'floor': 'script floor'})
    assert len(lines) == 3  # header, rule, publish
    cells = [c.strip() for c in lines[2].split('|')]
    assert cells == ['publish (msg/s, higher=better)', '10,000', '9,000', '9,091', '8,257',
                     f'{design / publish["ceiling"]:.2f}', f'{6000 / design:.2f}']
    assert report.floor_table(report.summarize(samples()), LABELS) == []


def test_main_table_without_ceilings_keeps_the_old_columns():
    rows = report.summarize(samples(prefork={'kombu': [1000], 'streams': [1500]}))
    lines = report.main_table(rows, LABELS)
    assert lines[0].split('|')[-1].strip() == 'ratio'
    assert [c.strip() for c in lines[2].split('|')] == [
        'celery prefork -c2, drain (task/s)', '1,000', '1,500', '1.50']


def test_celery_table_lists_the_brokers_that_ran():
    rows = report.summarize(samples(
        apply={'kombu': [3000], 'streams': [3200], 'rabbit': [5200], 'rabbit_confirm': []},
        prefork={'kombu': [1400], 'streams': [2300], 'rabbit': [2500]},
    ))
    lines = report.celery_table(rows, list(LABELS.items()))
    names = [line.split('|')[0].strip() for line in lines[2:]]
    assert names == ['kombu redis', 'kombu-streams', 'RabbitMQ classic']
    assert [c.strip() for c in lines[4].split('|')] == ['RabbitMQ classic', '5,200', '2,500',
                                                       'n/a']
    assert report.celery_table(report.summarize(samples()), list(LABELS.items())) == []


@pytest.mark.parametrize(('installed', 'used', 'blocked', 'words'), [
    ('3.5.0', True, False, ['3.5.0: used', '--no-hiredis']),
    ('3.5.0', False, True, ['not used (--no-hiredis)']),
    (None, False, False, ['not installed', 'pip install hiredis']),
])
def test_hiredis_line(installed, used, blocked, words):
    line = report.hiredis_line(installed, used, blocked)
    for word in words:
        assert word in line
