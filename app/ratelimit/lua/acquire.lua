-- acquire.lua: decide every rate-limit dimension of one request atomically.
--
-- KEYS[i]            one key per dimension that is on; all share the tenant's hash tag.
-- ARGV[1]            request id (the member of the concurrency sets)
-- ARGV[2]            concurrency lease, microseconds (a crashed worker's slot frees itself after it)
-- ARGV[3]            token cost to reserve for "t" dimensions (the caller's estimate, >= 1; each "t" key
--                    takes at most its own limit of it)
-- ARGV[4i..4i+3]     per KEYS[i]: kind ("r" requests, "t" tokens, "c" concurrency), limit, window (us),
--                    burst (units an idle tenant may spend at once, 1..limit; unused for "c");
--                    for "b" (a budget window): "b", cap (nano-dollars), when the window ends (unix ms),
--                    the request's worst-case cost (nano-dollars, an integer)
--
-- Returns {allowed (1|0), refused index (0 = none), retry after (us), then per key: remaining, reset (us)}.
-- Nothing is written unless every dimension admits, so a refusal consumes nothing.
--
-- GCRA ("generic cell rate algorithm"), one string key per "r"/"t" dimension:
--   A limit of N units per window W means one unit is emitted every T = W / N.  The key holds the TAT
--   ("theoretical arrival time"): the instant at which the bucket would be full again if nothing else came.
--   TAT - now is how much credit is already spoken for.  A request of cost c is admitted when
--   max(TAT, now) + c*T - now <= B*T, i.e. its units still fit in a burst of B units; admitting it moves
--   TAT forward by c*T.  So an idle tenant can spend B at once, then one more unit every T: never more
--   than B + t/T units in any span t (B + N in any window), and no fixed-window edge where 2N slip through.
--   A token request costing more than B units fits when the bucket is full (its tolerance is its own cost),
--   or it could never be admitted.
--   Once TAT <= now the bucket is full and the key is useless, so it expires exactly then.
-- Budgets ("b"): a plain counter per tenant and window (its name carries the window, so a new window starts at 0).
--   A request is admitted when counter + its worst-case cost <= cap, and the cost is added; finish.lua corrects it
--   to the real cost. Not a rate: a refused request waits for the window to end. The counter outlives its
--   window by BUDGET_GRACE, so a request still running at the reset settles into it rather than into nothing.
-- The clock is Redis's (TIME), so workers with skewed clocks agree.  Redis >= 5 replicates script
-- effects, which makes the non-deterministic TIME call safe.
--
-- Every number that becomes a TTL, a score or a reply is kept within MAX_AHEAD (a year) of now, even for
-- arguments the caller never sends (a cost of 1e30, a NaN): an out-of-range PX or PEXPIRE would make this
-- call an error instead of a decision.

local MAX_AHEAD = 365 * 86400 * 1000000  -- microseconds
local BUDGET_GRACE = 3600 * 1000  -- milliseconds

-- A TTL in milliseconds for a span in microseconds: at least 1, at most MAX_AHEAD (NaN becomes 1).
local function px(us)
  local ms = math.ceil(us / 1000)
  if not (ms >= 1) then return 1 end
  if ms > MAX_AHEAD / 1000 then return MAX_AHEAD / 1000 end
  return ms
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local request_id = ARGV[1]
local lease = tonumber(ARGV[2])
if not (lease >= 1) then lease = 1 end
if lease > MAX_AHEAD then lease = MAX_AHEAD end
local tokens = tonumber(ARGV[3])
if not (tokens >= 1) then tokens = 1 end

local n = #KEYS
local out = {1, 0, 0}
local writes = {}
local states = {}  -- per key: {remaining, reset} before and after consuming
local worst_retry = -1

for i = 1, n do
  local base = 4 * i
  local kind = ARGV[base]
  local limit = tonumber(ARGV[base + 1])
  local window = tonumber(ARGV[base + 2])
  local burst = tonumber(ARGV[base + 3]) or limit
  if not (burst >= 1) then burst = 1 end  -- also NaN
  if burst > limit then burst = limit end
  local key = KEYS[i]
  local ok, retry

  if kind == 'b' then
    local cost = tonumber(ARGV[base + 3])
    if not (cost >= 0) then cost = 0 end
    local reset = window * 1000 - now
    if not (reset >= 1) then reset = 1 end
    if reset > MAX_AHEAD then reset = MAX_AHEAD end
    local spent = tonumber(redis.call('GET', key) or 0)
    ok = spent + cost <= limit
    states[i] = {limit - spent, reset, limit - spent - cost, reset}
    if ok then
      writes[#writes + 1] = {'b', key, ARGV[base + 3], now / 1000 + reset / 1000 + BUDGET_GRACE}
    else
      retry = reset
    end
  elseif kind == 'c' then
    -- Concurrency: a sorted set of request ids scored by lease expiry; expired leases are dropped first.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local count = redis.call('ZCARD', key)
    if redis.call('ZSCORE', key, request_id) then
      count = count - 1 -- the same request asking again already holds its slot
    end
    ok = count < limit
    states[i] = {limit - count, 0, limit - count - 1, 0}
    if ok then
      writes[#writes + 1] = {'c', key}
    else
      -- When a slot frees is unknowable (it is the end of someone's answer): suggest a short wait.
      retry = 1000000
    end
  else
    local period = window / limit           -- T: microseconds per unit
    local cost = 1
    -- A request larger than the whole budget can never fit: it reserves the whole budget, so it is admitted
    -- into a full bucket instead of being refused forever (the caller clamps the same way and settles the
    -- real usage later; usage beyond the budget then becomes debt, a TAT beyond now + W).
    if kind == 't' then cost = math.min(tokens, limit) end
    local tat = tonumber(redis.call('GET', key) or now)
    if tat < now then tat = now end        -- a full bucket does not bank credit beyond N
    local tolerance = math.max(burst, cost) * period
    local allow_at = tat + cost * period - tolerance
    local new_tat = math.min(tat + cost * period, now + MAX_AHEAD)
    -- Remaining = whole units that could be spent right now (the epsilon absorbs float rounding).
    local credit = burst * period
    states[i] = {
      math.floor((credit - (tat - now)) / period + 1e-6), tat - now,
      math.floor((credit - (new_tat - now)) / period + 1e-6), new_tat - now,
    }
    ok = allow_at <= now
    if ok then
      writes[#writes + 1] = {'g', key, new_tat}
    else
      retry = allow_at - now
    end
  end

  if not ok then
    out[1] = 0
    if retry > worst_retry then
      -- Report the dimension that keeps the caller waiting longest: nothing is admitted before it frees.
      worst_retry = retry
      out[2] = i
      out[3] = math.ceil(retry)
    end
  end
end

-- Report each dimension as it stands after this call: consumed if admitted, untouched if refused.
local after = 0
if out[1] == 1 then after = 2 end
for i = 1, n do
  local remaining = states[i][1 + after]
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(states[i][2 + after])
end

if out[1] == 1 then
  for _, w in ipairs(writes) do
    if w[1] == 'g' then
      -- %.17g keeps the fractional microseconds (tostring would round to 14 digits).
      redis.call('SET', w[2], string.format('%.17g', w[3]), 'PX', px(w[3] - now))
    elseif w[1] == 'b' then
      redis.call('INCRBY', w[2], w[3])
      redis.call('PEXPIREAT', w[2], string.format('%.0f', w[4]))
    else
      redis.call('ZADD', w[2], string.format('%.17g', now + lease), request_id)
      -- The set lives as long as its newest lease; release() empties it (and Redis deletes it) sooner.
      local ttl = px(lease)
      if redis.call('PTTL', w[2]) < ttl then
        redis.call('PEXPIRE', w[2], ttl)
      end
    end
  end
end

return out
