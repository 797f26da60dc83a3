"""A report page as the tests read it (stdlib HTML parser)."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """What a page holds: sections by name (their text), ids, links, svgs, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.ids: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self._open: list[str | None] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag == "section":
            name = a.get("data-section")
            self._open.append(name)
            if name:
                self.sections.setdefault(name, [])
        elif self._open and tag == "section":
            self._open.append(None)

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "section" and self._open:
            self._open.pop()

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        for name in self._open:
            if name:
                self.sections[name].append(data)

    def text(self, section: str) -> str:
        return " ".join(" ".join(self.sections[section]).split())
