"""The production online store: Redis (Debian's `redis-server`, redis-py). Keys, under a namespace (default
`pf`):

    pf:rt:<user>            list of packed events (the realtime list; RPUSH then LTRIM to the newest realtime_cap)
    pf:emb:<version>        hash user -> the float32 embeddings, concatenated in the version's layout
    pf:life:<version>       hash user -> packed lifelong events
    pf:layout:<version>     JSON {name: width};  pf:versions: set of written versions;  pf:current: the published one
    pf:batch:<client>\0<id> the digest of an ingestion batch already applied (kept 7 days);  pf:events: count
    pf:log:<day>            a stream: the event log's partition of that UTC day (field "e": the entry, JSON)
    pf:logdays              set of the log's partitions
    pf:fc:<day>:u:<user>    the counters (features): the packed events of the user that day (APPEND);
    pf:fc:<day>:i:<item>    the item's;  pf:fc:<day>:g: hash "<bucket>:<action>" -> count;  pf:fc:<day>:s: set of the
                            events counted ("<user>\\0<item>\\0<action>\\0<time>");  pf:fc:days: set of the days

An ingestion batch is one Lua script (Redis runs a script alone, and its effects reach the append-only file
together), so its realtime events, log entries and counters are applied whole or not at all; reading a user's
daily data is one script too, so the version and the data read belong together, and so is reading the counters. A
Redis that is down or restarting gives StoreUnavailable with its address; redis-py reconnects by itself once it is
back.
"""

from __future__ import annotations

import json

import numpy as np
import redis

from pinnerformer.data.clock import DAY, utc_day
from pinnerformer.errors import PinnerformerError
from pinnerformer.serving.store import (
    BATCH_WINDOW_S, DEFAULT_CLIENT, EVENT, REALTIME_CAP, BatchConflict, Counters, OnlineStore, StoreUnavailable,
    batch_digest, batch_key, buckets_before, check_day, check_version, counter_range, counter_rows, pack,
    pack_vectors, unpack, unpack_vectors, vector_layout,
)

# KEYS: the count, the batch key, nu realtime lists, nd log streams, the set of log days.
# ARGV: cap, batch id given, window, record size, digest, nu, nu blobs, nd entries, nd days, the namespace, ne,
# then per event: day, user, item, action, its member of the day's set of counted events, record, hour, minute,
# second buckets.
# Returns the events appended, 0 for a batch applied before, -1 for a batch id reused with other events.
APPEND = """
local cap, size, nu, n = tonumber(ARGV[1]), tonumber(ARGV[4]), tonumber(ARGV[6]), 0
if ARGV[2] == '1' then
  local seen = redis.call('GET', KEYS[2])
  if seen then if seen == ARGV[5] then return 0 else return -1 end end
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[3])
end
for i = 1, nu do
  local blob, items = ARGV[6 + i], {}
  for j = 1, #blob, size do items[#items + 1] = string.sub(blob, j, j + size - 1) end
  for s = 1, #items, 1000 do redis.call('RPUSH', KEYS[2 + i], unpack(items, s, math.min(s + 999, #items))) end
  redis.call('LTRIM', KEYS[2 + i], -cap, -1)
  n = n + #items
end
local nd = #KEYS - 3 - nu
for d = 1, nd do
  redis.call('XADD', KEYS[2 + nu + d], '*', 'e', ARGV[6 + nu + d])
  redis.call('SADD', KEYS[#KEYS], ARGV[6 + nu + nd + d])
end
local base = 6 + nu + 2 * nd
local ns, ne = ARGV[base + 1], tonumber(ARGV[base + 2])
for e = 0, ne - 1 do
  local o = base + 3 + 9 * e
  local p = ns .. ':fc:' .. ARGV[o]
  if redis.call('SADD', p .. ':s', ARGV[o + 4]) == 1 then
    redis.call('APPEND', p .. ':u:' .. ARGV[o + 1], ARGV[o + 5])
    redis.call('APPEND', p .. ':i:' .. ARGV[o + 2], ARGV[o + 5])
    local a = ':' .. ARGV[o + 3]
    redis.call('HINCRBY', p .. ':g', 'd' .. a, 1)
    for k = 6, 8 do redis.call('HINCRBY', p .. ':g', ARGV[o + k] .. a, 1) end
    redis.call('SADD', ns .. ':fc:days', ARGV[o])
  end
end
redis.call('INCRBY', KEYS[1], n)
return n
"""

DAILY = """
local v = ARGV[2]
if v == '' then v = redis.call('GET', KEYS[1]) end
if not v then return {false, false, false} end
return {redis.call('GET', ARGV[1] .. ':layout:' .. v), redis.call('HGET', ARGV[1] .. ':emb:' .. v, ARGV[3]),
        redis.call('HGET', ARGV[1] .. ':life:' .. v, ARGV[3])}
"""

# ARGV: the namespace, the first and last day, nu, users, the items (comma-separated), the number of actions na, nt,
# then per request time not at a midnight: its index, its day, its second of that day. Returns per day held in the
# range {the day, the users' events, the items' events (one string), the day's count per action, per time of that
# day {its index, the count per action of its buckets before it (`store.buckets_before`)}}: names, sums and joins are
# made here, so a request's few hundred buckets and blobs cross the wire as a few values.
COUNTERS = """
local ns, first, last = ARGV[1], ARGV[2], ARGV[3]
local nu = tonumber(ARGV[4])
local users = 5
local items = {}
for x in string.gmatch(ARGV[users + nu], '%d+') do items[#items + 1] = x end
local at = users + nu + 1
local na, nt = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
at = at + 2
local below = {}
for k = 1, nt do
  local day, off = ARGV[at + 1], tonumber(ARGV[at + 2])
  local h, m, s = math.floor(off / 3600), math.floor(off % 3600 / 60), off % 60
  local names = {}
  for i = 0, h - 1 do names[#names + 1] = string.format('h%02d', i) end
  for i = 0, m - 1 do names[#names + 1] = string.format('m%02d%02d', h, i) end
  for i = 0, s - 1 do names[#names + 1] = string.format('s%02d%02d%02d', h, m, i) end
  below[day] = below[day] or {}
  table.insert(below[day], {ARGV[at], names})
  at = at + 3
end
local function counts(key, fields)
  local c = {}
  for a = 1, na do c[a] = 0 end
  for s = 1, #fields, 1000 do
    local got = redis.call('HMGET', key, unpack(fields, s, math.min(s + 999, #fields)))
    for j = 1, #got do
      if got[j] then
        local a = (s + j - 2) % na + 1
        c[a] = c[a] + tonumber(got[j])
      end
    end
  end
  return c
end
local days = {}
for _, d in ipairs(redis.call('SMEMBERS', ns .. ':fc:days')) do
  if d >= first and d <= last then days[#days + 1] = d end
end
table.sort(days)
local out = {}
for k, day in ipairs(days) do
  local p = ns .. ':fc:' .. day
  local us, is, whole, within = {}, {}, {}, {}
  for i = 0, nu - 1 do us[i + 1] = redis.call('GET', p .. ':u:' .. ARGV[users + i]) or '' end
  -- the candidates' lists in MGETs of up to 1000 keys (one call each, not one per item)
  for s = 1, #items, 1000 do
    local keys = {}
    for i = s, math.min(s + 999, #items) do keys[#keys + 1] = p .. ':i:' .. items[i] end
    for _, v in ipairs(redis.call('MGET', unpack(keys))) do is[#is + 1] = v or '' end
  end
  for a = 0, na - 1 do whole[a + 1] = 'd:' .. a end
  for _, b in ipairs(below[day] or {}) do
    local fields = {}
    for _, name in ipairs(b[2]) do
      for a = 0, na - 1 do fields[#fields + 1] = name .. ':' .. a end
    end
    within[#within + 1] = {b[1], counts(p .. ':g', fields)}
  end
  out[k] = {day, us, table.concat(is), counts(p .. ':g', whole), within}
end
return out
"""


def redacted(url: str) -> str:
    """The URL without its password (it goes into messages, logs and answers)."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not at:
        return url
    user = auth.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"


class RedisStore(OnlineStore):
    def __init__(self, url: str, realtime_cap: int = REALTIME_CAP, namespace: str = "pf"):
        self.url, self.realtime_cap, self.ns = redacted(url), realtime_cap, namespace  # never the password
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        except ValueError as e:
            raise PinnerformerError(f"store {self.url}: not a Redis URL ({e}); expected redis://HOST:PORT/DB") from None
        self._append = self.r.register_script(APPEND)
        self._daily = self.r.register_script(DAILY)
        self._counters = self.r.register_script(COUNTERS)

    def _call(self, fn):
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable: {e}") from None
        except redis.ResponseError as e:
            raise StoreUnavailable(f"Redis at {self.url} refused a command: {e}") from None

    def append(self, batch: dict[str, np.ndarray], batch_id: str | None = None, *, client: str = DEFAULT_CLIENT,
               log: dict[str, bytes] | None = None) -> int:
        users, days = list(batch), sorted(log or {})
        for day in days:
            check_day(day)
        keys = ([f"{self.ns}:events", f"{self.ns}:batch:{batch_key(client, batch_id or '')}"]
                + [f"{self.ns}:rt:{u}" for u in users] + [f"{self.ns}:log:{d}" for d in days] + [f"{self.ns}:logdays"])
        args = [self.realtime_cap, 1 if batch_id is not None else 0, BATCH_WINDOW_S, EVENT.itemsize,
                batch_digest(batch) if batch_id is not None else b"", len(users)]
        args += [pack(batch[u]) for u in users] + [log[d] for d in days] + days
        rows = list(counter_rows(batch))
        args += [self.ns, len(rows)]
        for user, day, names, item, action, ts, record in rows:
            args += [day, user, item, action, f"{user}\0{item}\0{action}\0{ts}", record, *names[1:]]
        n = int(self._call(lambda: self._append(keys=keys, args=args)))
        if n < 0:
            raise BatchConflict(f"batch_id {batch_id!r} of client {client!r} was applied with other events (ids are "
                                "kept for 7 days): give this batch an id of its own")
        return n

    def counters(self, since: int, users: list[str], items: list[int], times: list[int], n_actions: int
                 ) -> Counters:
        span = counter_range(since, times)
        args = [self.ns, *(span or ("", "")), len(users), *users, ",".join(map(str, map(int, items))), n_actions]
        below = [i for i, t in enumerate(times) if t % DAY]
        args.append(len(below))
        for i in below:
            args += [i, utc_day(times[i]).isoformat(), times[i] % DAY]
        got = self._call(lambda: self._counters(keys=[], args=args)) if span else []
        per_day = {d.decode(): rest for d, *rest in got}
        days = sorted(per_day)
        before = np.zeros((len(times), n_actions), np.int64)
        for d in days:
            within = {int(i): c for i, c in per_day[d][3]}
            for i, t in enumerate(times):
                names = buckets_before(d, t)  # the whole day, part of it (summed by the script), or none
                before[i] += per_day[d][2] if names == ["d"] else within[i] if names else 0
        return Counters({u: unpack(b"".join(per_day[d][0][i] for d in days)) for i, u in enumerate(users)},
                        unpack(b"".join(per_day[d][1] for d in days)), before)

    def prune_counters(self, before: int) -> list[str]:
        last = utc_day(before - 1).isoformat()
        days = sorted(d.decode() for d in self._call(lambda: self.r.smembers(f"{self.ns}:fc:days")))
        dropped = [d for d in days if d <= last]
        for d in dropped:
            def drop() -> None:
                keys = list(self.r.scan_iter(match=f"{self.ns}:fc:{d}:*", count=1000))
                for s in range(0, len(keys), 1000):
                    self.r.unlink(*keys[s:s + 1000])
                self.r.srem(f"{self.ns}:fc:days", d)

            self._call(drop)
        return dropped

    def check_log_id(self, entry_id: str) -> str:
        ms, dash, seq = entry_id.partition("-")
        if not (dash and ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit() and len(entry_id) <= 41):
            raise ValueError(f"not a stream entry id: {entry_id!r}")
        return entry_id

    def log_days(self) -> list[str]:
        return sorted(d.decode() for d in self._call(lambda: self.r.smembers(f"{self.ns}:logdays")))

    def read_log(self, day: str, after: str | None = None) -> list[tuple[str, bytes]]:
        key, out = f"{self.ns}:log:{check_day(day)}", []
        while True:  # in pages: one reply never holds a whole busy day
            start = "-" if after is None else f"({after}"
            rows = self._call(lambda: self.r.xrange(key, start, "+", count=10_000))
            out += [(i.decode(), fields[b"e"]) for i, fields in rows]
            if len(rows) < 10_000:
                return out
            after = out[-1][0]

    def realtime(self, user: str) -> np.ndarray:
        return unpack(b"".join(self._call(lambda: self.r.lrange(f"{self.ns}:rt:{user}", 0, -1))))

    def put_daily(self, version: str, users: list[str], vectors: dict[str, np.ndarray],
                  lifelong: dict[str, np.ndarray] | None = None) -> None:
        check_version(version)
        layout = vector_layout(users, vectors)
        rows = pack_vectors(vectors)

        def write() -> None:
            pipe = self.r.pipeline(transaction=False)
            pipe.set(f"{self.ns}:layout:{version}", json.dumps(layout))
            for s in range(0, len(users), 5000):
                pipe.hset(f"{self.ns}:emb:{version}", mapping={u: v.tobytes() for u, v in
                                                               zip(users[s:s + 5000], rows[s:s + 5000])})
            life = list((lifelong or {}).items())
            for s in range(0, len(life), 5000):
                pipe.hset(f"{self.ns}:life:{version}", mapping={u: pack(r) for u, r in life[s:s + 5000]})
            pipe.sadd(f"{self.ns}:versions", version)  # last: a version is listed once its data is there
            pipe.execute()

        self._call(write)

    def publish(self, version: str) -> None:
        check_version(version)
        if not self._call(lambda: self.r.sismember(f"{self.ns}:versions", version)):
            raise PinnerformerError(f"publish: version {version!r} was never written to {self.url}")
        self._call(lambda: self.r.set(f"{self.ns}:current", version))

    def current_version(self) -> str | None:
        v = self._call(lambda: self.r.get(f"{self.ns}:current"))
        return v.decode() if v is not None else None

    def versions(self) -> list[str]:
        return sorted(v.decode() for v in self._call(lambda: self.r.smembers(f"{self.ns}:versions")))

    def drop_version(self, version: str) -> None:
        check_version(version)
        if version == self.current_version():
            raise PinnerformerError(f"drop_version: {version!r} is the current version of {self.url}")
        self._call(lambda: self.r.pipeline().srem(f"{self.ns}:versions", version).delete(
            f"{self.ns}:emb:{version}", f"{self.ns}:life:{version}", f"{self.ns}:layout:{version}").execute())

    def daily(self, user: str, version: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        layout, vec, life = self._call(lambda: self._daily(keys=[f"{self.ns}:current"],
                                                           args=[self.ns, version or "", user]))
        if layout is None:
            return {}, np.zeros(0, EVENT)
        return unpack_vectors(vec, json.loads(layout)), unpack(life or None)

    def event_count(self) -> int:
        return int(self._call(lambda: self.r.get(f"{self.ns}:events")) or 0)

    def ping(self) -> None:
        self._call(self.r.ping)

    def close(self) -> None:
        self.r.close()
