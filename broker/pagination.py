"""List conventions of the API (DESIGN.md §6): query strings decoded by msgspec, `skip`/`limit`
(or `page`/`per_page`), `sort_by`/`sort_order`, and `{total, skip, limit, items, has_more}`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from aiohttp import web

from broker.errors import ValidationFailed

T = TypeVar("T")
Q = TypeVar("Q")

MAX_LIMIT = 1000


class PageQuery(msgspec.Struct, kw_only=True):
    """The paging part of a list's query string; subclass it to add filters."""

    skip: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] = 100
    page: Annotated[int, msgspec.Meta(ge=1)] | None = None
    per_page: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] | None = None
    sort_by: str | None = None
    sort_order: Literal["asc", "desc"] = "asc"

    def window(self) -> tuple[int, int]:
        """(skip, limit), with `page`/`per_page` taking precedence when given."""
        if self.page is not None or self.per_page is not None:
            per_page = self.per_page or self.limit
            return ((self.page or 1) - 1) * per_page, per_page
        return self.skip, self.limit


class Page(msgspec.Struct, Generic[T]):
    total: int
    skip: int
    limit: int
    items: list[T]
    has_more: bool


def decode_query(request: web.Request, type_: type[Q]) -> Q:
    """Decode the query string as `type_` (numbers and booleans from text); 422 naming the
    parameter on bad input. A repeated parameter keeps its last value. A parameter that is
    present always has a value: `?per_page=null` is refused, not read as absent."""
    raw = dict(request.query)
    try:
        query = msgspec.convert(raw, type_, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("$.", "query parameter ")
        raise ValidationFailed(message, details=[{"reason": message}]) from None
    names = zip(type_.__struct_encode_fields__, type_.__struct_fields__, strict=True)  # type: ignore[attr-defined]
    for name, attr in names:
        if name in raw and getattr(query, attr) is None:
            message = f"query parameter {name} must not be null (leave it out instead)"
            raise ValidationFailed(message, details=[{"field": name, "reason": message}])
    return query


def paginate(
    items: Sequence[T],
    query: PageQuery,
    sort_keys: dict[str, Callable[[T], Any]],
    default_sort: str,
    render: Callable[[T], Any],
) -> Page[Any]:
    """Sort `items` by `query.sort_by` (one of `sort_keys`), cut the requested window, render it."""
    sort_by = query.sort_by or default_sort
    key = sort_keys.get(sort_by)
    if key is None:
        allowed = ", ".join(sorted(sort_keys))
        raise ValidationFailed(
            f"sort_by must be one of: {allowed}",
            details=[{"field": "sort_by", "allowed": sorted(sort_keys)}],
        )
    ordered = sorted(items, key=key, reverse=query.sort_order == "desc")
    skip, limit = query.window()
    window = ordered[skip : skip + limit]
    return Page(
        total=len(ordered),
        skip=skip,
        limit=limit,
        items=[render(x) for x in window],
        has_more=skip + len(window) < len(ordered),
    )
