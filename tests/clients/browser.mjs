// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) follows a
// scan link to a landing page on another origin that loads /sdk.js, records a view,
// clicks Draw, and saves a screenshot. A second page checks that a batch whose answer
// is lost is retried with the same event_ids, and that events queued when the user
// leaves the page still go out (sendBeacon). Prints what it saw as one JSON line.
//
//   node browser.mjs COLLECTOR_URL SCREENSHOT_PATH
import { chromium } from "playwright-core";

const [collector, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = {};
try {
  // 1. Scan link -> 302 -> landing page (other origin) -> view -> draw.
  const page = await browser.newPage();
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  await page.goto(`${collector}/s/parcel-lottery/jd`);
  await page.waitForFunction(() => document.getElementById("status")?.textContent === "ready");
  out.landing = page.url();
  out.uid = await page.evaluate(() => funnelhouse.userId());
  const drawSent = page.waitForResponse(
    (r) => r.url().endsWith("/v1/events") && (r.request().postData() || "").includes('"draw"'));
  await page.click("#draw");
  const drawResponse = await drawSent;
  out.draw_status = drawResponse.status();
  out.draw_answer = await drawResponse.json();
  await page.screenshot({ path: screenshot, fullPage: true });
  out.console_errors = consoleErrors;
  await page.close();

  // 2. A lost answer: the first batch reaches the server, the page sees a 503, the SDK
  //    retries with the same event_ids.
  const retryPage = await browser.newPage();
  const bodies = [];
  let lost = false;
  await retryPage.route("**/v1/events", async (route) => {
    const response = await route.fetch();
    if (!lost) {
      lost = true;
      await route.fulfill({ status: 503, headers: { "access-control-allow-origin": "*",
        "content-type": "application/json" }, body: '{"error":"answer lost"}' });
    } else {
      await route.fulfill({ response });
    }
    // Counted once answered, so the route is not removed under a request in flight.
    bodies.push(route.request().postData());
  });
  const landing = new URL(out.landing);
  await retryPage.goto(`${landing.origin}${landing.pathname}?fh_uid=retry-user&fh_channel=tmall&fh_campaign=parcel-lottery`);
  await retryPage.waitForFunction(() => document.getElementById("status")?.textContent === "ready");
  const deadline = Date.now() + 15000;
  while (bodies.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  out.retry_ids = bodies.map((b) => JSON.parse(b).events.map((e) => e.event_id));
  await retryPage.unroute("**/v1/events");

  // 3. Leaving the page right after a track: the queued event goes out on page hide.
  await retryPage.evaluate(() => funnelhouse.track("leave"));
  await retryPage.goto("about:blank");
  // Keep the browser up until the beacon has arrived (closing it could cut it off).
  const stored = async () => {
    const r = await fetch(`${collector}/v1/sql`, { method: "POST", body: JSON.stringify({
      sql: "SELECT count(*) FROM events WHERE user_id = 'retry-user' AND event = 'leave'" }) });
    return (await r.json()).rows[0][0];
  };
  const beaconDeadline = Date.now() + 20000;
  while ((out.beacon_stored = await stored()) < 1 && Date.now() < beaconDeadline) {
    await new Promise((r) => setTimeout(r, 200));
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
