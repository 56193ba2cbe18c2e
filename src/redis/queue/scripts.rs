//! The queue's Lua scripts: each step that must be atomic on the server.

use ::redis::Script;

/// `KEYS`: stream, closed marker. `ARGV`: capacity, payloads. All are
/// queued (1) or none: 0 no room for them all, -1 closed.
const PUSH: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('XLEN', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'item', ARGV[i])
end
return 1
";

/// Reads an entry's `item` and `prior` (deliveries before it was queued
/// again) fields; shared by the scripts below.
const FIELDS: &str = r"
local function fields(f)
  local item, prior = '', 0
  if type(f) ~= 'table' then return item, prior end
  for i = 1, #f, 2 do
    if f[i] == 'item' then item = f[i + 1]
    elseif f[i] == 'prior' then prior = tonumber(f[i + 1]) end
  end
  return item, prior
end
";

/// Settles deliveries, each atomically. `KEYS`: stream, dead-letter
/// stream. `ARGV`: group, consumer, mode (`ack`, `retry`, `dead`), max
/// deliveries, reason, the smallest and the largest entry id, then (entry
/// id, delivery count) pairs. Per pair: 1
/// settled, 0 the lease is no longer this delivery's (expired and claimed
/// again), -1 not pending.
const SETTLE: &str = r"
local out = {}
local done = {}
local mode = ARGV[3]
-- This consumer's leases in the range of the ids, in one call.
local mine = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[6], ARGV[7], #ARGV, ARGV[2])) do
  mine[p[1]] = p[4]
end
for i = 8, #ARGV, 2 do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local count = mine[id]
  if count == nil then
    -- Not in the (possibly cut short) range answer: ask for it alone.
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if #p == 0 then count = -1
    elseif p[1][2] ~= ARGV[2] then count = 0
    else count = p[1][4] end
  end
  if count == -1 then
    table.insert(out, -1)
  elseif count ~= n then
    table.insert(out, 0)
  else
    if mode ~= 'ack' then
      local e = redis.call('XRANGE', KEYS[1], id, id)
      local item, prior = '', 0
      if #e > 0 then item, prior = fields(e[1][2]) end
      local delivered = prior + n
      if mode == 'retry' and delivered < tonumber(ARGV[4]) then
        redis.call('XADD', KEYS[1], '*', 'item', item, 'prior', delivered)
      else
        local reason = ARGV[5]
        if mode == 'retry' then reason = 'nacked; delivered ' .. delivered .. ' times' end
        redis.call('XADD', KEYS[2], '*', 'item', item, 'reason', reason,
          'deliveries', delivered, 'source', id)
      end
    end
    table.insert(done, id)
    table.insert(out, 1)
  end
end
if #done > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(done))
  redis.call('XDEL', KEYS[1], unpack(done))
end
return out
";

/// Claims entries idle for longer than the lease (their consumer died or
/// hung), up to a count, or dead-letters them at the delivery limit.
/// `KEYS`: stream, dead-letter stream. `ARGV`: group, consumer, min idle
/// (ms), cursor, max deliveries, count. `{cursor, entry…}`, each entry
/// `{id, 'dead', deliveries}` or `{id, 'item', item, count, prior}`.
const RECLAIM: &str = r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[6])
local out = {r[1]}
for _, e in ipairs(r[2]) do
  local id = e[1]
  if type(e[2]) ~= 'table' then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local item, prior = fields(e[2])
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local count = p[1][4]
    local delivered = prior + count - 1
    if delivered >= tonumber(ARGV[5]) then
      redis.call('XADD', KEYS[2], '*', 'item', item,
        'reason', 'lease expired; delivered ' .. delivered .. ' times',
        'deliveries', delivered, 'source', id)
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      table.insert(out, {id, 'dead', delivered})
    else
      table.insert(out, {id, 'item', item, count, prior})
    end
  end
end
return out
";

/// Renews the leases of deliveries this consumer still holds (XCLAIM
/// JUSTID resets the idle time without counting a delivery). `KEYS`:
/// stream. `ARGV`: group, consumer, then (entry id, delivery count)
/// pairs. Returns the ids whose lease is no longer theirs.
const EXTEND: &str = r"
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 0 or p[1][2] ~= ARGV[2] or p[1][4] ~= tonumber(ARGV[i + 1]) then
    table.insert(lost, id)
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  end
end
return lost
";

/// Deletes the group's consumers that hold nothing and have been idle
/// longer than a limit (each process run adds a consumer; without this
/// they pile up in `XINFO CONSUMERS`). In one script, so a consumer that
/// is given an entry meanwhile is never deleted with it. `KEYS`: stream.
/// `ARGV`: group, this consumer, idle limit (ms). Returns how many went.
const FORGET: &str = r"
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle = nil, nil, nil
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name ~= ARGV[2] and pending == 0 and idle ~= nil and idle > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    gone = gone + 1
  end
end
return gone
";

pub(super) struct Scripts {
    pub(super) forget: Script,
    pub(super) push: Script,
    pub(super) settle: Script,
    pub(super) reclaim: Script,
    pub(super) extend: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            forget: Script::new(FORGET),
            push: Script::new(PUSH),
            settle: Script::new(&format!("{FIELDS}{SETTLE}")),
            reclaim: Script::new(&format!("{FIELDS}{RECLAIM}")),
            extend: Script::new(EXTEND),
        }
    }
}
