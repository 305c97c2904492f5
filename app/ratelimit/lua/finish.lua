-- finish.lua: settle a request's token estimate and/or give its concurrency slots back.
--
-- KEYS[1..m]         token (GCRA) keys to correct; all share the tenant's hash tag
-- KEYS[m+1..m+k]     budget counters to correct (see acquire.lua, kind "b")
-- KEYS[m+k+1..]      concurrency sets holding the request
-- ARGV[1]            request id
-- ARGV[2]            m, the number of token keys
-- ARGV[3]            k, the number of budget counters
-- ARGV[4+3(i-1)..]   per token key: limit, window (us), correction = actual - what the key holds
--                    (positive consumes more, negative gives back)
-- ARGV[4+3m+(j-1)]   per budget counter: correction = real cost - the worst case it holds (nano-dollars, an integer)
--
-- The correction moves the TAT (see acquire.lua) by delta * T.  It starts from max(TAT, now) because a
-- full bucket has no debt to repay; if the TAT lands at or before now the bucket is full and the key goes.
-- As in acquire.lua no TAT lies more than MAX_AHEAD past now, whatever usage is reported, so SET PX stays
-- in range.

local MAX_AHEAD = 365 * 86400 * 1000000  -- microseconds

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local request_id = ARGV[1]
local m = tonumber(ARGV[2])
local k = tonumber(ARGV[3])

for i = 1, m do
  local limit = tonumber(ARGV[3 * i + 1])
  local window = tonumber(ARGV[3 * i + 2])
  local delta = tonumber(ARGV[3 * i + 3])
  local key = KEYS[i]
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = math.min(tat + delta * (window / limit), now + MAX_AHEAD)
  if not (new_tat > now) then  -- also NaN
    redis.call('DEL', key)
  else
    local ttl = math.ceil((new_tat - now) / 1000)
    redis.call('SET', key, string.format('%.17g', new_tat), 'PX', ttl)
  end
end

for j = 1, k do
  -- A counter gone (its window ended more than the grace ago) is not brought back without its expiry.
  if redis.call('EXISTS', KEYS[m + j]) == 1 then
    redis.call('INCRBY', KEYS[m + j], ARGV[3 + 3 * m + j])
  end
end

for i = m + k + 1, #KEYS do
  -- ZREM of the last member deletes the set, so an idle tenant leaves nothing behind.
  redis.call('ZREM', KEYS[i], request_id)
end

return 1
