/*! Funnelhouse browser SDK: served by the collector at /sdk.js. No dependencies.
 *
 *   <script src="https://collector.example/sdk.js"></script>
 *   <script>
 *     funnelhouse.init({ endpoint: "https://collector.example", campaign: "parcel-lottery" });
 *     funnelhouse.track("view");
 *     button.onclick = () => funnelhouse.track("draw", { prize: "gold" });
 *   </script>
 *
 * The user and channel come from the scan link's redirect (?fh_uid=...&fh_channel=...),
 * else from this site's cookies, else a new anonymous id kept in a cookie. Events are
 * batched: a batch goes out within 1 s of its first event or at 20 events. A failed
 * send (network, 429, 5xx) is retried with the same event_ids, so the collector stores
 * each event once. When the page is hidden, what is queued goes out with sendBeacon.
 */
(function (global) {
  "use strict";
  var BATCH_MAX = 20;
  var BATCH_DELAY_MS = 1000;
  var RETRY_MAX = 8;
  var COOKIE_DAYS = 365;

  var config = null;
  var identity = { uid: "", channel: "", campaign: "" };
  var queue = [];
  var timer = null;

  function uuid() {
    if (global.crypto && global.crypto.randomUUID) return global.crypto.randomUUID();
    var b = new Uint8Array(16);
    (global.crypto || { getRandomValues: function (a) { for (var i = 0; i < a.length; i++) a[i] = Math.random() * 256; return a; } }).getRandomValues(b);
    b[6] = (b[6] & 15) | 64;
    b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function readCookie(name) {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var kv = parts[i].split("=");
      if (kv[0] === name) {
        try { return decodeURIComponent(kv.slice(1).join("=")); } catch (e) { return kv.slice(1).join("="); }
      }
    }
    return "";
  }

  function writeCookie(name, value) {
    var expires = new Date(Date.now() + COOKIE_DAYS * 864e5).toUTCString();
    document.cookie = name + "=" + encodeURIComponent(value) + "; expires=" + expires + "; path=/; SameSite=Lax";
  }

  function fromUrl(name) {
    try { return new URLSearchParams(global.location.search).get(name) || ""; } catch (e) { return ""; }
  }

  function url() {
    return config.endpoint.replace(/\/+$/, "") + "/v1/events";
  }

  function body(events) {
    return JSON.stringify({ sent_at: new Date().toISOString(), events: events });
  }

  function headers() {
    var h = { "Content-Type": "application/json" };
    if (config.writeKey) h.Authorization = "Bearer " + config.writeKey;
    return h;
  }

  // keepalive lets a send outlive the page, but browsers cap keepalive bodies at 64 KiB
  // in all, so it is used only for what goes out when the page is hidden.
  function send(events, attempt, keepalive) {
    var retry = function () {
      if (attempt >= RETRY_MAX) return;
      var delay = Math.min(30000, 500 * Math.pow(2, attempt));
      setTimeout(function () { send(events, attempt + 1, false); }, delay);
    };
    fetch(url(), { method: "POST", headers: headers(), body: body(events), keepalive: !!keepalive, credentials: "omit" })
      .then(function (res) {
        if (res.status === 429 || res.status >= 500) retry();
        else if (!res.ok && global.console) console.warn("funnelhouse: events refused (" + res.status + ")");
      }, retry);
  }

  function flush() {
    if (timer) { clearTimeout(timer); timer = null; }
    if (!queue.length) return;
    send(queue.splice(0, queue.length), 0, false);
  }

  // On page hide, fetch may be cut off; a beacon is delivered after the page is gone.
  // Beacons cannot carry an Authorization header, so with a write key a keepalive fetch goes.
  function flushOnHide() {
    if (timer) { clearTimeout(timer); timer = null; }
    if (!queue.length) return;
    var events = queue.splice(0, queue.length);
    var sent = false;
    if (!config.writeKey && global.navigator && navigator.sendBeacon) {
      sent = navigator.sendBeacon(url(), new Blob([body(events)], { type: "text/plain" }));
    }
    if (!sent) send(events, 0, true);
  }

  var funnelhouse = {
    /** init({endpoint, campaign, writeKey?, userId?, channel?}) */
    init: function (options) {
      config = options || {};
      if (!config.endpoint) config.endpoint = "";
      var uid = config.userId || fromUrl("fh_uid") || readCookie("fh_uid") || uuid();
      var channel = config.channel || fromUrl("fh_channel") || readCookie("fh_channel");
      identity = { uid: uid, channel: channel || "", campaign: config.campaign || fromUrl("fh_campaign") };
      writeCookie("fh_uid", uid);
      if (channel) writeCookie("fh_channel", channel);
      global.addEventListener("pagehide", flushOnHide);
      document.addEventListener("visibilitychange", function () {
        if (document.visibilityState === "hidden") flushOnHide();
      });
      return funnelhouse;
    },
    /** Queue one event; properties is an optional plain object. */
    track: function (event, properties) {
      if (!config) throw new Error("funnelhouse.init({endpoint, campaign}) must come first");
      var e = {
        event_id: uuid(),
        event: event,
        user_id: identity.uid,
        campaign: identity.campaign,
        channel: identity.channel,
        ts: new Date().toISOString()
      };
      if (properties) e.properties = properties;
      queue.push(e);
      if (queue.length >= BATCH_MAX) flush();
      else if (!timer) timer = setTimeout(flush, BATCH_DELAY_MS);
      return e.event_id;
    },
    /** Send what is queued now. */
    flush: flush,
    /** The anonymous or known id events are sent with. */
    userId: function () { return identity.uid; }
  };

  global.funnelhouse = funnelhouse;
})(typeof window !== "undefined" ? window : this);
