-- renew.lua: extend a running request's concurrency leases, so a long stream keeps its slots.
--
-- KEYS[1..n]         concurrency sets the request was admitted into; all share the tenant's hash tag
-- ARGV[1]            request id
-- ARGV[2]            lease, microseconds
--
-- Returns how many sets still held the request.  Only a member still present is renewed: a released slot
-- stays released.  A member whose lease has passed but is still in the set is renewed too, which is safe:
-- acquire.lua drops expired members before counting, so while it is still there no one has taken its place.

local MAX_AHEAD = 365 * 86400 * 1000000  -- microseconds, as in acquire.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local request_id = ARGV[1]
local lease = tonumber(ARGV[2])
if not (lease >= 1) then lease = 1 end
if lease > MAX_AHEAD then lease = MAX_AHEAD end
local ttl = math.ceil(lease / 1000)

local held = 0
for i = 1, #KEYS do
  if redis.call('ZSCORE', KEYS[i], request_id) then
    redis.call('ZADD', KEYS[i], string.format('%.17g', now + lease), request_id)
    if redis.call('PTTL', KEYS[i]) < ttl then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
    held = held + 1
  end
end

return held
