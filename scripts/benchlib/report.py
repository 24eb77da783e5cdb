"""The numbers of a run and their tables: medians, ratios, ceilings, targets. Pure: no I/O
beyond returning lines, no broker (``tests/test_bench_report.py`` checks it).

The ceiling of a workload is what any Kombu transport on this client and server could reach
at the most: a message costs at least what Kombu costs alone (``memory://``, no broker) plus
what redis-py and Redis cost at the least (the raw ceilings), so the best rate is
``1 / (1/alone + 1/raw)``. For latency the ceiling is the raw floor. "Fraction of ceiling"
is rate / ceiling (latency: floor / latency): 1.0 is as good as it gets.

The script floor (``floor``, benchlib/raw.py) is the same for a design that runs each
message's work in one Lua script, as kombu-streams' does: the design's ceiling is
``1 / (1/alone + 1/floor)``, and its fraction of the ceiling is the most such a transport
could reach of it.
"""

from __future__ import annotations

import statistics

#: Table rows: key, title, number format.
ROWS = (
    ('publish', 'publish (msg/s, higher=better)', '{:,.0f}'),
    ('batch', 'batch publish (msg/s)', '{:,.0f}'),
    ('consume1', 'consume+ack prefetch 1 (msg/s)', '{:,.0f}'),
    ('consume100', 'consume+ack prefetch 100 (msg/s)', '{:,.0f}'),
    ('pub10q', 'publish, 10 queues x 10 prio (msg/s)', '{:,.0f}'),
    ('con10q', 'consume+ack p100, 10 queues x 10 prio', '{:,.0f}'),
    ('pub100q', 'publish, 100 queues x 10 prio (msg/s)', '{:,.0f}'),
    ('con100q', 'consume+ack p100, 100 queues x 10 prio', '{:,.0f}'),
    ('apply', 'celery apply_async (task/s)', '{:,.0f}'),
    ('prefork_all', 'celery prefork -c2, incl. start (task/s)', '{:,.0f}'),
    ('prefork', 'celery prefork -c2, drain (task/s)', '{:,.0f}'),
    ('threads_all', 'celery threads -c8, incl. start (task/s)', '{:,.0f}'),
    ('threads', 'celery threads -c8, drain (task/s)', '{:,.0f}'),
    ('lat50', 'latency p50 (us, lower=better)', '{:,.0f}'),
    ('lat99', 'latency p99 (us)', '{:,.0f}'),
    ('cmds', 'Redis commands/msg (pub+consume+ack)', '{:.2f}'),
    ('scripts', '  of which EVAL/EVALSHA/msg', '{:.2f}'),
    ('trips', 'round trips/msg (client sends)', '{:.2f}'),
    ('cmds1', 'Redis commands/msg, consume+ack p1', '{:.2f}'),
    ('trips1', 'round trips/msg, consume+ack p1', '{:.2f}'),
    ('mem', 'memory/queued msg (used_memory, B)', '{:,.0f}'),
    ('keymem', 'memory/queued msg (MEMORY USAGE, B)', '{:,.0f}'),
)
LOWER_IS_BETTER = {'lat50', 'lat99', 'cmds', 'scripts', 'trips', 'cmds1', 'trips1', 'mem',
                   'keymem'}
#: Rows with a ceiling: 'rate' (1 / (1/alone + 1/raw)) or 'floor' (the raw latency).
CEILING_ROWS = {'publish': 'rate', 'consume1': 'rate', 'consume100': 'rate',
                'lat50': 'floor', 'lat99': 'floor'}
#: The two transports compared in the ratio and the fractions.
BASE, OURS = 'kombu', 'streams'
#: The Celery table (``--peers``): its columns and the brokers' rows.
CELERY_COLUMNS = (('apply', 'apply_async'), ('prefork', 'prefork -c2 drain'),
                  ('threads', 'threads -c8 drain'))

#: Targets: issue, name, rows (all must meet it), measure, op, threshold. Measures: 'ratio'
#: (kombu-streams / Kombu), 'fraction' (kombu-streams' fraction of the ceiling), 'x floor'
#: (kombu-streams' latency / the raw floor), 'vs:KEY' (kombu-streams / subject KEY).
TARGETS = (
    (5, 'publish', ('publish',), 'ratio', '>=', 2.0),
    (5, 'batch publish', ('batch',), 'ratio', '>=', 2.0),
    (5, 'consume+ack prefetch 1', ('consume1',), 'ratio', '>=', 2.0),
    (5, 'consume+ack prefetch 100', ('consume100',), 'ratio', '>=', 5.0),
    (5, 'Celery drain (prefork, threads)', ('prefork', 'threads'), 'ratio', '>=', 1.5),
    (5, 'latency p50', ('lat50',), 'ratio', '<=', 1.0),
    (5, 'commands per message', ('cmds',), 'ratio', '<=', 0.5),
    (5, 'commands per message at prefetch 1', ('cmds1',), 'ratio', '<=', 0.5),
    (5, 'memory per queued msg (used_memory, MEMORY USAGE)', ('mem', 'keymem'), 'ratio', '<=',
     1.5),
    (20, 'publish, fraction of ceiling', ('publish',), 'fraction', '>=', 0.85),
    (20, 'consume+ack p1, fraction of ceiling', ('consume1',), 'fraction', '>=', 0.85),
    (20, 'consume+ack p100, fraction of ceiling', ('consume100',), 'fraction', '>=', 0.85),
    (20, 'latency p50 / raw floor', ('lat50',), 'x floor', '<=', 1.5),
    (20, 'Celery drains / RabbitMQ classic', ('prefork', 'threads'), 'vs:rabbit', '>=', 1.1),
    (20, 'apply_async / RabbitMQ classic+confirms', ('apply',), 'vs:rabbit_confirm', '>=', 1.0),
)


def ceiling(alone: float | None, raw: float | None) -> float | None:
    """The best rate of a transport costing ``1/alone`` in Kombu and ``1/raw`` in redis-py
    and Redis per message: the costs add up, so the rates combine as 1 / (1/a + 1/r)."""
    if not alone or not raw:
        return None
    return 1.0 / (1.0 / alone + 1.0 / raw)


def median(values: list) -> float | None:
    """None when a subject has no sample, or when one of its runs had no value (n/a)."""
    return statistics.median(values) if values and None not in values else None


def summarize(samples: dict[str, dict[str, list]]) -> list[dict]:
    """Per row: the median of each subject, the ratio kombu-streams / Kombu, the ceiling and
    each transport's fraction of it. ``samples[row][subject]`` lists one value per round."""
    rows = []
    for key, title, fmt in ROWS:
        med = {subject: median(values) for subject, values in samples.get(key, {}).items()}
        base, ours = med.get(BASE), med.get(OURS)
        ratio = ours / base if base and ours is not None else None
        kind, top = CEILING_ROWS.get(key), None
        if kind == 'rate':
            top = ceiling(med.get('alone'), med.get('raw'))
        elif kind == 'floor':
            top = med.get('raw')
        fraction = {}
        if top:
            for subject in (BASE, OURS):
                value = med.get(subject)
                if value:
                    fraction[subject] = value / top if kind == 'rate' else top / value
        design = ceiling(med.get('alone'), med.get('floor')) if kind == 'rate' else None
        rows.append({'key': key, 'title': title, 'format': fmt, 'median': med, 'ratio': ratio,
                     'ceiling': top, 'fraction': fraction, 'design': design,
                     'samples': samples.get(key, {})})
    return rows


def measure(row: dict, how: str) -> float | None:
    """The value a target compares: see TARGETS."""
    med = row['median']
    if how == 'ratio':
        return row['ratio']
    if how == 'fraction':
        return row['fraction'].get(OURS)
    if how == 'x floor':
        return med[OURS] / row['ceiling'] if row['ceiling'] and med.get(OURS) else None
    if how.startswith('vs:'):
        peer = med.get(how[3:])
        return med[OURS] / peer if peer and med.get(OURS) is not None else None
    raise ValueError(f'unknown measure {how!r}')


def check_targets(rows: list[dict], issue: int) -> list[dict]:
    by_key = {r['key']: r for r in rows}
    results = []
    for number, name, keys, how, op, threshold in TARGETS:
        if number != issue:
            continue
        values = [measure(by_key[k], how) for k in keys]
        met = None not in values and all(v >= threshold if op == '>=' else v <= threshold
                                         for v in values)
        result = {'name': name, 'rows': list(keys), 'measure': how, 'op': op,
                  'threshold': threshold, 'values': values, 'met': met}
        if how == 'ratio':
            result['ratios'] = values  # the key bench.json had before the other measures
        results.append(result)
    return results


def target_lines(title: str, targets: list[dict]) -> list[str]:
    lines = [title]
    width = max(len(t['name']) for t in targets)
    for t in targets:
        values = ' / '.join('n/a' if v is None else f'{v:.2f}' for v in t['values'])
        verdict = ('met' if t['met'] else
                   'not run' if all(v is None for v in t['values']) else 'not met')
        lines.append(f"  {t['name']:<{width}}  {t['op']} {t['threshold']:<4}  {values:<11}  "
                     f"{verdict}")
    return lines


def cell(fmt: str, value: float | None, missing: str = 'n/a') -> str:
    return missing if value is None else fmt.format(value)


def table(columns: list[tuple[str, str, int]], body: list[list[str]],
          groups: list[tuple[str, int]] | None = None) -> list[str]:
    """Lines of a table: ``columns`` (header, align '<' or '>', width), the first one the
    row titles; ``groups`` an optional line above: (text, number of columns it spans)."""
    widths = [max(w, len(h), *(len(r[i]) for r in body)) for i, (h, _, w) in enumerate(columns)]

    def line(cells: list[str], aligns: list[str], sizes: list[int]) -> str:
        return ' | '.join(f'{c:{a}{s}}' for c, a, s in zip(cells, aligns, sizes)).rstrip()

    aligns = [a for _, a, _ in columns]
    out = []
    if groups:
        at = 0
        for text, span in groups:  # a group's text wider than its columns widens the last
            room = sum(widths[at:at + span]) + 3 * (span - 1)
            widths[at + span - 1] += max(0, len(text) - room)
            at += span
        texts, sizes, at = [], [], 0
        for text, span in groups:
            texts.append(text)
            sizes.append(sum(widths[at:at + span]) + 3 * (span - 1))
            at += span
        out.append('   '.join(f'{t:^{n}}' for t, n in zip(texts, sizes)).rstrip())
    header = line([h for h, _, _ in columns], aligns, widths)
    out += [header, '-' * len(header)]
    out += [line(r, aligns, widths) for r in body]
    return out


def main_table(rows: list[dict], labels: dict[str, str]) -> list[str]:
    """The transports side by side with their ratio; where any ceiling was measured, also
    raw redis-py, Kombu alone, the ceiling and both transports' fraction of it."""
    rows = [r for r in rows if any(v is not None for v in r['median'].values())] or rows
    ceilings = any(r['ceiling'] for r in rows)
    columns = [('workload', '<', 0), (labels[BASE], '>', 12), (labels[OURS], '>', 13),
               ('ratio', '>', 6)]
    if ceilings:
        columns += [(labels['raw'], '>', 9), (labels['alone'], '>', 9), ('ceiling', '>', 9),
                    ('kombu', '>', 7), ('streams', '>', 7)]
    body = []
    for r in rows:
        fmt, med = r['format'], r['median']
        cells = [r['title'], cell(fmt, med.get(BASE)), cell(fmt, med.get(OURS)),
                 cell('{:.2f}', r['ratio'])]
        if ceilings:
            kind = CEILING_ROWS.get(r['key'])
            cells += [cell(fmt, med.get('raw'), '') if kind else '',
                      cell(fmt, med.get('alone'), '') if kind == 'rate' else '',
                      cell(fmt, r['ceiling'], ''),
                      cell('{:.2f}', r['fraction'].get(BASE), ''),
                      cell('{:.2f}', r['fraction'].get(OURS), '')]
        body.append(cells)
    groups = [('', 4), ('', 3), ('fraction of ceiling', 2)] if ceilings else None
    return table(columns, body, groups)


def floor_table(rows: list[dict], labels: dict[str, str]) -> list[str]:
    """Where a Lua-script design stands against the ceiling: the script floor beside the raw
    ceilings, the design's ceiling, its fraction of the ceiling, and kombu-streams' fraction
    of the design's ceiling. Empty when the floor was not measured."""
    body = []
    for r in rows:
        if not r.get('design'):
            continue
        fmt, med = r['format'], r['median']
        ours = med.get(OURS)
        body.append([r['title'], cell(fmt, med.get('raw'), ''), cell(fmt, med.get('floor'), ''),
                     cell(fmt, r['ceiling'], ''), cell(fmt, r['design'], ''),
                     cell('{:.2f}', r['design'] / r['ceiling'] if r['ceiling'] else None, ''),
                     cell('{:.2f}', ours / r['design'] if ours else None, '')])
    if not body:
        return []
    columns = [('workload', '<', 0), (labels['raw'], '>', 9), (labels['floor'], '>', 12),
               ('ceiling', '>', 9), ('design ceiling', '>', 14), ('/ ceiling', '>', 9),
               (f"{labels[OURS]} / design", '>', 22)]
    return table(columns, body)


def ceiling_note() -> list[str]:
    return ['ceiling = 1 / (1/raw + 1/alone) for a rate, the raw floor for latency;',
            'fraction of ceiling = rate / ceiling (latency: floor / latency); 1.0 is the most '
            'any Kombu transport can do here']


def celery_table(rows: list[dict], subjects: list[tuple[str, str]]) -> list[str]:
    """Celery's own paths per broker (rows) for the brokers that ran them, task/s."""
    by_key = {r['key']: r for r in rows}
    columns = [('tasks/s', '<', 0)] + [(title, '>', 11) for _, title in CELERY_COLUMNS]
    body = []
    for subject, label in subjects:
        values = [by_key[k]['median'].get(subject) for k, _ in CELERY_COLUMNS]
        if any(v is not None for v in values):
            body.append([label] + [cell('{:,.0f}', v) for v in values])
    return table(columns, body) if body else []



def header_line(head: dict) -> str:
    return (f"{head['date']}  {head['machine']}  {head['cpus']} CPUs  Redis {head['redis']}  "
            f"Python {head['python']}  kombu {head['kombu']}  celery {head['celery']}  "
            f"redis-py {head['redis-py']}{' +hiredis' if head['hiredis'] else ''}  "
            f"kombu-streams {head['kombu-streams']}  PING {head.get('ping_rtt_ms', '?')} ms"
            + (f" (through a delay proxy asked for {head['rtt_ms_asked']:g} ms)"
               if head.get('rtt_ms_asked') else '')
            + (f"  RabbitMQ {head['rabbitmq']}" if head.get('rabbitmq') else ''))


def hiredis_line(installed: str | None, used: bool, blocked: bool) -> str:
    """Whether redis-py parses replies with hiredis, and how to run the other way."""
    if used:
        return (f'hiredis {installed}: used (scripts/bench --no-hiredis runs the same '
                'without it)')
    if installed and blocked:
        return f'hiredis {installed}: installed, not used (--no-hiredis)'
    if installed:
        return (f'hiredis {installed}: installed, but redis-py does not use it '
                '(too old for it?)')
    return ('hiredis: not installed: redis-py parses replies in Python (pip install hiredis, '
            'or kombu-streams[hiredis], to measure with it)')
