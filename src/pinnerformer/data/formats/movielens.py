"""MovieLens readers.

`movielens`: ML-1M (`ratings.dat` `UserID::MovieID::Rating::Timestamp`, `movies.dat` `MovieID::Title::Genres`,
latin-1) or ML-100K (`u.data` tab-separated `user item rating timestamp`, `u.item` `|`-separated with 19 genre
flags named in `u.genre`), detected from the folder.
`movielens-latest`: `ratings.csv` + `tags.csv` (a second kind of action, `tag`) + `movies.csv`.

Ratings become action types by a `RatingRule`; genres become item interests; title + genres the item text.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pinnerformer.data.formats.base import (
    Checker, RawLog, cast_float, cast_int, read_csv_records, read_lines, split_fields,
)
from pinnerformer.data.formats.ratings import DEFAULT_RATING_POSITIVE, DEFAULT_RATING_RULE, RatingRule, apply_rating_rule
from pinnerformer.config import StrictModel
from pinnerformer.errors import InputError

TS_EXPECTED = "an integer Unix timestamp in seconds"


class MovieLensOptions(StrictModel):
    """Options of the `movielens` and `movielens-latest` formats."""

    rating_rule: str = DEFAULT_RATING_RULE  # rating -> action type, inclusive ranges
    positive: list[str] = DEFAULT_RATING_POSITIVE


def movie_text(title: pl.Expr, genres: pl.Expr) -> pl.Expr:
    """Item text for MovieLens: "Title (year). Genres: A, B"."""
    return pl.concat_str([title, pl.lit(". Genres: "), genres.list.join(", ")])


def _folder(path: Path, marker_files: list[str], fmt: str) -> Path:
    if not path.exists():
        raise InputError("input not found", path=path, expected=f"a folder with {' or '.join(marker_files)}")
    folder = path if path.is_dir() else path.parent
    if not any((folder / m).exists() for m in marker_files):
        raise InputError(f"not a {fmt} folder: none of {', '.join(marker_files)} found", path=folder,
                         expected=f"a folder with {' or '.join(marker_files)}")
    return folder


def _require(folder: Path, name: str, what: str) -> Path:
    p = folder / name
    if not p.exists():
        raise InputError(f"missing file {name} ({what})", path=folder, expected=f"{folder / name}")
    return p


def _ratings_events(df: pl.DataFrame, rule: RatingRule, checker: Checker) -> pl.DataFrame:
    df = cast_int(df, "user", checker, "user id")
    df = cast_int(df, "item", checker, "movie id")
    df = cast_float(df, "rating", checker, "rating")
    df = cast_int(df, "ts", checker, "timestamp", expected=TS_EXPECTED)
    df = apply_rating_rule(df, rule, checker)
    # The raw rating is kept as `detail` so that two different ratings at the same second stay distinct.
    return df.select("user", "item", "action", "ts",
                     pl.lit(None, pl.String).alias("surface"), pl.lit(None, pl.Float64).alias("duration"),
                     pl.col("rating").cast(pl.String).alias("detail"), "_file", "_line")


def read_movielens(path: Path, options: MovieLensOptions, skip_invalid: bool) -> RawLog:
    rule, positive = RatingRule.parse(options.rating_rule), options.positive
    folder = _folder(path, ["ratings.dat", "u.data"], "MovieLens (ML-1M or ML-100K)")
    skipped: dict[str, int] = {}
    checker = Checker(skip_invalid, skipped)
    if (folder / "ratings.dat").exists():
        variant = "ml-1m"
        ratings = _require(folder, "ratings.dat", "ratings")
        movies = _require(folder, "movies.dat", "titles and genres")
        ev = split_fields(read_lines(ratings, "latin-1", checker), ratings, "::", ["user", "item", "rating", "ts"],
                          checker,
                          "UserID::MovieID::Rating::Timestamp")
        mv = split_fields(read_lines(movies, "latin-1", checker), movies, "::", ["item", "title", "genres"], checker,
                          "MovieID::Title::Genres")
        mv = cast_int(mv, "item", checker, "movie id")
        genres = pl.col("genres").str.split("|")
    else:
        variant = "ml-100k"
        ratings = _require(folder, "u.data", "ratings")
        movies = _require(folder, "u.item", "titles and genre flags")
        genre_file = _require(folder, "u.genre", "genre names")
        ev = split_fields(read_lines(ratings, "latin-1", checker), ratings, "\t", ["user", "item", "rating", "ts"],
                          checker,
                          "user<TAB>item<TAB>rating<TAB>timestamp")
        gn = split_fields(read_lines(genre_file, "latin-1", checker), genre_file, "|", ["name", "idx"], checker,
                          "name|index")
        gn = cast_int(gn, "idx", checker, "genre index").sort("idx")
        names = gn["name"].to_list()
        if gn["idx"].to_list() != list(range(len(names))):
            raise InputError("genre indices are not 0..n-1", path=genre_file, expected="lines 'name|0' … 'name|n-1'")
        flags = [f"g{i}" for i in range(len(names))]
        mv = split_fields(read_lines(movies, "latin-1", checker), movies, "|",
                          ["item", "title", "release", "video_release", "url", *flags], checker,
                          f"movie id|title|release date|video release date|IMDb URL|{len(names)} genre flags")
        mv = cast_int(mv, "item", checker, "movie id")
        bad_flag = pl.any_horizontal([~pl.col(f).is_in(["0", "1"]) for f in flags])
        mv = checker.check(mv, bad_flag, reason="malformed_lines", problem="genre flag is not 0 or 1", field=None,
                           expected="19 genre flags, each 0 or 1", text_col="raw")
        genres = pl.concat_list([pl.when(pl.col(f) == "1").then(pl.lit(n)) for f, n in zip(flags, names)]
                                ).list.drop_nulls()
    events = _ratings_events(ev, rule, checker)
    items = mv.select(pl.col("item"), genres.alias("interests"), pl.col("title"))
    items = items.select("item", movie_text(pl.col("title"), pl.col("interests")).alias("text"), "interests")
    return RawLog(events=events, ts_unit="s", actions=rule.actions(), positive=positive, items=items,
                  sources=[ratings, movies] + ([] if variant == "ml-1m" else [genre_file]), skipped=skipped,
                  options={"variant": variant, "rating_rule": str(rule)})


def read_movielens_latest(path: Path, options: MovieLensOptions, skip_invalid: bool, tag_action: str = "tag") -> RawLog:
    rule, positive = RatingRule.parse(options.rating_rule), options.positive
    folder = _folder(path, ["ratings.csv"], "MovieLens latest")
    skipped: dict[str, int] = {}
    checker = Checker(skip_invalid, skipped)
    ratings = _require(folder, "ratings.csv", "ratings")
    movies = _require(folder, "movies.csv", "titles and genres")
    tags = folder / "tags.csv"

    def csv(path: Path, header: list[str]) -> pl.DataFrame:
        return read_csv_records(path, header, checker, required=header)

    ev = csv(ratings, ["userId", "movieId", "rating", "timestamp"]).rename(
        {"userId": "user", "movieId": "item", "timestamp": "ts"})
    events = _ratings_events(ev, rule, checker)
    sources = [ratings, movies]
    actions = rule.actions()
    if tags.exists():
        tg = csv(tags, ["userId", "movieId", "tag", "timestamp"]).rename(
            {"userId": "user", "movieId": "item", "timestamp": "ts"})
        tg = cast_int(tg, "user", checker, "user id")
        tg = cast_int(tg, "item", checker, "movie id")
        tg = cast_int(tg, "ts", checker, "timestamp", expected=TS_EXPECTED)
        tg = tg.select("user", "item", pl.lit(tag_action).alias("action"), "ts",
                       pl.lit(None, pl.String).alias("surface"), pl.lit(None, pl.Float64).alias("duration"),
                       pl.col("tag").alias("detail"), "_file", "_line")
        events = pl.concat([events, tg])
        sources.append(tags)
        if tag_action in actions:
            raise InputError(f"tag action name '{tag_action}' is also a rating action", field="tag-action")
        actions = actions + [tag_action]
    mv = read_csv_records(movies, ["movieId", "title", "genres"], checker, required=["movieId", "title"])
    mv = mv.rename({"movieId": "item"})
    mv = cast_int(mv, "item", checker, "movie id")
    # "(no genres listed)" is MovieLens' way of saying the list is empty.
    genres = pl.col("genres").str.split("|").list.eval(pl.element().filter(pl.element() != "(no genres listed)"))
    items = mv.select("item", genres.alias("interests"), "title")
    items = items.select("item", movie_text(pl.col("title"), pl.col("interests")).alias("text"), "interests")
    return RawLog(events=events, ts_unit="s", actions=actions, positive=positive, items=items, sources=sources,
                  skipped=skipped, options={"rating_rule": str(rule), "tag_action": tag_action})
