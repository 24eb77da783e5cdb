"""Check that every internal link of the built HTML resolves: the file it names exists and so
does the ``#fragment`` in it. Sphinx's own linkcheck needs the internet; this needs nothing,
and together with ``sphinx-build -n`` (every cross reference resolved) it catches a page, a
section or an image that moved.

    python docs/checklinks.py docs/_build/html

Exits 1 listing each broken link as ``page: href``.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in ('id', 'name'):
                self.ids.add(value)
            elif name in ('href', 'src') and not (tag == 'link' and name == 'href'
                                                 and value.startswith('http')):
                self.links.append(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding='utf-8'))
    return page


def broken(root: Path) -> list[str]:
    """Each internal link under ``root`` that does not resolve, as ``page: href``."""
    pages = {p.resolve(): _parse(p) for p in sorted(root.rglob('*.html'))}
    if not pages:
        return [f'{root}: no HTML pages (was the site built?)']
    bad = []
    for path, page in pages.items():
        for href in page.links:
            url = urlsplit(href)
            if url.scheme or url.netloc:  # http(s), mailto, data: not ours to check
                continue
            target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if target.is_dir():
                target = target / 'index.html'
            if not target.exists():
                bad.append(f'{path.relative_to(root.resolve())}: {href}')
            elif url.fragment and target.suffix == '.html' and \
                    url.fragment not in pages[target].ids:
                bad.append(f'{path.relative_to(root.resolve())}: {href} (no such anchor)')
    return bad


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else 'docs/_build/html')
    bad = broken(root)
    for line in bad:
        print(f'broken link: {line}', file=sys.stderr)
    count = sum(len(_parse(p).links) for p in root.rglob('*.html'))
    print(f'checklinks: {count} links in {root}, {len(bad)} broken')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
