"""A storefront's server in miniature, for scripts/browser-test: it serves a page that follows
the customer's requests with an `EventSource`, and forwards the page's calls under /api/ to the
api with the customer's bearer token, which never reaches the browser (an `EventSource` cannot
send an `Authorization` header, and the api takes credentials in no other place). Streams are
passed on as they come, `Last-Event-ID` included, so the browser's own reconnection resumes.

    python3 storefront.py PORT API_ORIGIN TOKEN
"""

import http.client
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, API, TOKEN = int(sys.argv[1]), sys.argv[2], sys.argv[3]
API_HOST = urllib.parse.urlsplit(API).netloc

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>Your requests</title></head>
<body>
<h1>Your requests</h1>
<ul id="sent"></ul>
<ul id="events"></ul>
<div id="state">connecting</div>
<script>
const params = new URLSearchParams(location.search);
const user = params.get("user"), coupon = params.get("coupon"), product = params.get("product");
const expected = 2;
const state = document.getElementById("state");
const note = (list, attributes, text) => {
  const item = document.createElement("li");
  for (const [name, value] of Object.entries(attributes)) item.setAttribute(name, value);
  item.textContent = text;
  document.getElementById(list).appendChild(item);
};
const send = async (path, body) => {
  const answer = await fetch("/api" + path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const json = await answer.json();
  note("sent", {"class": "sent", "data-status": answer.status, "data-request-id": json.requestId || ""},
       path + " " + answer.status);
};
const source = new EventSource("/api/users/" + user + "/requests/stream");
let commanded = false, received = 0;
source.onopen = () => {
  state.textContent = "open";
  if (commanded) return;
  commanded = true;
  send("/coupons/" + coupon + "/issue", {userId: Number(user)})
    .then(() => send("/orders", {userId: Number(user), items: [{productId: Number(product), quantity: 1}]}))
    .catch((e) => { state.textContent = "could not send: " + e; });
};
source.addEventListener("request", (event) => {
  const request = JSON.parse(event.data);
  note("events", {"class": "event", "data-request-id": request.requestId, "data-status": request.status,
                  "data-type": request.type, "data-last-event-id": event.lastEventId},
       request.type + " " + request.status);
  received += 1;
  if (received >= expected) {
    source.close();
    state.textContent = "done";
  }
});
source.onerror = () => { if (state.textContent !== "done") state.textContent = "error, reconnecting"; };
setTimeout(() => { if (state.textContent !== "done") { source.close(); state.textContent = "timed out"; } }, 30000);
</script>
</body></html>
"""


class Storefront(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/page"):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)
        else:
            self.forward()

    def do_POST(self):
        self.forward()

    def forward(self):
        if not self.path.startswith("/api/"):
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {"Authorization": "Bearer " + TOKEN}
        for name in ("Content-Type", "Accept", "Last-Event-ID"):
            if self.headers.get(name):
                headers[name] = self.headers[name]
        upstream = http.client.HTTPConnection(API_HOST, timeout=60)
        upstream.request(self.command, self.path[len("/api"):], body=body, headers=headers)
        answer = upstream.getresponse()
        self.send_response(answer.status)
        for name in ("Content-Type", "Cache-Control", "Retry-After", "Location"):
            if answer.getheader(name):
                self.send_header(name, answer.getheader(name))
        # HTTP/1.0: the body ends with the connection, so a stream is passed on as it comes.
        self.end_headers()
        try:
            while True:
                chunk = answer.read1(65536)
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page closed its stream
        finally:
            upstream.close()

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Storefront).serve_forever()
