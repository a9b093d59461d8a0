//! The edge cache against the letter of RFC 9111 (HTTP caching), RFC 9213 (targeted cache
//! control) and the range rules of RFC 9110 §14, end to end over h1, h2 and h3: a scripted origin
//! (raw HTTP/1.1 on a real socket, so it can send any header combination, interim responses
//! included) behind an edge whose `static` route caches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meridian_config::{Config, RouteCache};
use meridian_gateway::edge::RunningEdge;
use meridian_tests::{
    local_config, metric_value, secure, source_for, Client, Protocol, Reply, Secure, World,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "static.example.test";

/// One scripted answer: optional raw interim responses, then the final head and body.
#[derive(Clone, Debug, Default)]
struct Script {
    interim: Vec<String>,
    /// When set, the final response waits (after the interim ones went out) until notified.
    gate: Option<Arc<tokio::sync::Notify>>,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn script(status: u16, headers: &[(&str, &str)], body: &str) -> Script {
    Script {
        interim: Vec::new(),
        gate: None,
        status,
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body: body.as_bytes().to_vec(),
    }
}

/// A request as the origin saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The origin's script (by path and query) and what it has seen.
#[derive(Default)]
struct Origin {
    replies: Mutex<HashMap<String, Script>>,
    seen: Mutex<Vec<Seen>>,
}

impl Origin {
    fn set(&self, path: &str, script: Script) {
        lock(&self.replies).insert(path.to_string(), script);
    }

    fn requests_for(&self, path: &str) -> Vec<Seen> {
        lock(&self.seen)
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(listener: TcpListener, origin: Arc<Origin>) {
    while let Ok((stream, _)) = listener.accept().await {
        let origin = Arc::clone(&origin);
        tokio::spawn(async move {
            let _ = connection(stream, origin).await;
        });
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Keep-alive HTTP/1.1: reads each request (Content-Length or chunked body), answers its script.
async fn connection(mut stream: TcpStream, origin: Arc<Origin>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_string();
        let path = request_line.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let seen = Seen {
            method,
            path,
            headers,
        };
        if seen
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            while find(&buf, b"0\r\n\r\n").is_none() {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let end = find(&buf, b"0\r\n\r\n").map_or(0, |i| i + 5);
            buf.drain(..end);
        } else {
            let length: usize = seen
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..length);
        }
        let script = lock(&origin.replies)
            .get(&seen.path)
            .cloned()
            .unwrap_or_else(|| script(404, &[], "no script\n"));
        let head_only = seen.method == "HEAD";
        lock(&origin.seen).push(seen);
        let mut out = Vec::new();
        for interim in &script.interim {
            out.extend_from_slice(interim.as_bytes());
        }
        if let Some(gate) = &script.gate {
            stream.write_all(&out).await?;
            out.clear();
            gate.notified().await;
        }
        out.extend_from_slice(format!("HTTP/1.1 {} Scripted\r\n", script.status).as_bytes());
        for (name, value) in &script.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        let bodyless = matches!(script.status, 204 | 304);
        if !bodyless {
            out.extend_from_slice(format!("content-length: {}\r\n", script.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if !bodyless && !head_only {
            out.extend_from_slice(&script.body);
        }
        stream.write_all(&out).await?;
    }
}

/// A World whose `static` route caches, and a second edge on the same config whose every
/// upstream is the scripted origin.
struct Rig {
    edge: RunningEdge,
    origin: Arc<Origin>,
    world: World,
    protocol: Secure,
}

fn rig(protocol: Secure, edit: impl FnOnce(&mut RouteCache)) -> Rig {
    rig_with(protocol, edit, |_| {})
}

/// [`rig`] with an edit of the whole config as well (`[edge.cache]`, ...).
fn rig_with(
    protocol: Secure,
    edit: impl FnOnce(&mut RouteCache),
    edit_config: impl FnOnce(&mut Config),
) -> Rig {
    let mut config: Config = local_config();
    edit_config(&mut config);
    for region in &mut config.regions {
        region.health.enabled = false;
    }
    let route = config
        .routes
        .iter_mut()
        .find(|r| r.name == "static")
        .expect("route static");
    route.cache = RouteCache {
        enabled: true,
        ..RouteCache::default()
    };
    route.retry.attempts = 1;
    edit(&mut route.cache);
    let mut world = World::start(config);
    let origin = Arc::new(Origin::default());
    let listener = {
        let _runtime = world.runtime.enter();
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind origin");
        std.set_nonblocking(true).expect("nonblocking");
        TcpListener::from_std(std).expect("tokio listener")
    };
    let address: SocketAddr = listener.local_addr().expect("origin address");
    world.runtime.spawn(serve(listener, Arc::clone(&origin)));
    for region in &mut world.config.regions {
        region.upstreams.truncate(1);
        for upstream in &mut region.upstreams {
            upstream.address = address.to_string();
        }
    }
    let edge = world.start_edge("scripted-edge");
    Rig {
        edge,
        origin,
        world,
        protocol,
    }
}

impl Rig {
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let source = source_for("US");
        let body = body.as_bytes().to_vec();
        let reply = match self.protocol {
            Secure::H1 => self
                .world
                .runtime
                .block_on(Client::new(self.edge.http_addr).request(
                    Protocol::Http1,
                    source,
                    method,
                    HOST,
                    path,
                    headers,
                    body,
                )),
            protocol => {
                let tls = self.world.tls.as_ref().expect("World TLS");
                let target = self.edge.https_addr.expect("edge https");
                self.world.runtime.block_on(secure::request(
                    protocol,
                    tls.roots(),
                    target,
                    source,
                    method,
                    HOST,
                    path,
                    headers,
                    body,
                ))
            }
        };
        reply.unwrap_or_else(|e| panic!("{method} {path} over {:?}: {e:#}", self.protocol))
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", path, headers, "")
    }

    fn metric(&self, series: &str) -> f64 {
        let text = meridian_tests::metrics_text(&self.world.runtime, &self.edge);
        metric_value(&text, series).unwrap_or(0.0)
    }
}

fn cache(reply: &Reply) -> &str {
    reply.header("x-meridian-cache").unwrap_or("-")
}

fn http_date(at: SystemTime) -> String {
    // IMF-fixdate by hand, so the test does not lean on the code under test.
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64).expect("timestamp");
    let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        [t.weekday().number_days_from_monday() as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][t.month() as usize - 1];
    format!(
        "{day}, {:02} {month} {} {:02}:{:02}:{:02} GMT",
        t.day(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Shared-cache safety: a response to a request carrying `Cookie` is neither served from nor
/// stored in the cache, so an attacker who goes first cannot plant a page shaped by their cookie.
fn cookie_requests_cannot_poison(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let path = "/account";
    rig.origin.set(
        path,
        script(200, &[("cache-control", "max-age=600")], "hello attacker"),
    );
    let attacker = rig.get(path, &[("cookie", "sid=attacker")]);
    assert_eq!(attacker.status, 200, "{}", attacker.text());
    assert_eq!(cache(&attacker), "bypass");
    rig.origin.set(
        path,
        script(200, &[("cache-control", "max-age=600")], "hello guest"),
    );
    let victim = rig.get(path, &[]);
    assert_eq!(
        (cache(&victim), victim.text().as_str()),
        ("miss", "hello guest")
    );
    let next = rig.get(path, &[]);
    assert_eq!((cache(&next), next.text().as_str()), ("hit", "hello guest"));
    // A cookie-bearing request is not answered from the cache either.
    let with_cookie = rig.get(path, &[("cookie", "sid=other")]);
    assert_eq!(cache(&with_cookie), "bypass");
    assert_eq!(rig.origin.requests_for(path).len(), 3);
}

/// A response with `Set-Cookie` is not stored by default (a shared cache would hand one client's
/// cookie to everyone); with the route's `store_set_cookie = true` it is stored as it came, the
/// cookie included, and replayed on hits.
fn set_cookie_is_stored_only_when_allowed(protocol: Secure) {
    let cookie = [
        ("cache-control", "max-age=600"),
        ("set-cookie", "theme=dark"),
    ];
    let default = rig(protocol, |_| {});
    default.origin.set("/cookie", script(200, &cookie, "x"));
    for _ in 0..2 {
        let reply = default.get("/cookie", &[]);
        assert_eq!(cache(&reply), "miss");
        assert_eq!(reply.header("set-cookie"), Some("theme=dark"));
    }
    let allowed = rig(protocol, |c| c.allow_set_cookie = true);
    allowed.origin.set("/cookie", script(200, &cookie, "x"));
    assert_eq!(cache(&allowed.get("/cookie", &[])), "miss");
    let hit = allowed.get("/cookie", &[]);
    assert_eq!(
        (cache(&hit), hit.header("set-cookie")),
        ("hit", Some("theme=dark"))
    );
}

/// RFC 9111 §4.3.4: a 304's `Set-Cookie` goes to the client whose request revalidated and is never
/// stored; a 304 that makes the response unstorable removes the entry.
fn revalidation_never_stores_set_cookie(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let path = "/page";
    let validated = [("cache-control", "no-cache"), ("etag", "\"v1\"")];
    rig.origin.set(path, script(200, &validated, "page v1"));
    assert_eq!(cache(&rig.get(path, &[])), "miss");
    // The attacker's request revalidates; the origin hands it a session cookie on the 304.
    rig.origin.set(
        path,
        script(
            304,
            &[
                ("cache-control", "no-cache"),
                ("etag", "\"v1\""),
                ("set-cookie", "sid=attacker"),
            ],
            "",
        ),
    );
    let attacker = rig.get(path, &[]);
    assert_eq!(cache(&attacker), "revalidated");
    assert_eq!(attacker.header("set-cookie"), Some("sid=attacker"));
    assert_eq!(
        rig.origin.requests_for(path)[1].header("if-none-match"),
        Some("\"v1\"")
    );
    rig.origin.set(path, script(304, &validated, ""));
    let victim = rig.get(path, &[]);
    assert_eq!(cache(&victim), "revalidated");
    assert_eq!(victim.text(), "page v1");
    assert_eq!(
        victim.header("set-cookie"),
        None,
        "the cookie was not stored"
    );
    // The origin now says no-store on the 304: the entry is removed.
    rig.origin.set(
        path,
        script(
            304,
            &[("cache-control", "no-store"), ("etag", "\"v1\"")],
            "",
        ),
    );
    assert_eq!(rig.get(path, &[]).text(), "page v1");
    rig.origin.set(path, script(200, &validated, "page v2"));
    let after = rig.get(path, &[]);
    assert_eq!((cache(&after), after.text().as_str()), ("miss", "page v2"));
    let last = rig.origin.requests_for(path);
    assert_eq!(
        last.last().and_then(|s| s.header("if-none-match")),
        None,
        "nothing stored was left to revalidate"
    );
}

/// RFC 9111 §4.4: a non-error answer to an unsafe method invalidates the URL and same-origin
/// Location / Content-Location; an error answer does not. Counted by reason.
fn unsafe_methods_invalidate(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let fresh = [("cache-control", "max-age=600")];
    for path in ["/item", "/list", "/elsewhere"] {
        rig.origin.set(path, script(200, &fresh, path));
        assert_eq!(cache(&rig.get(path, &[])), "miss", "{path}");
        assert_eq!(cache(&rig.get(path, &[])), "hit", "{path}");
    }
    rig.origin.set("/item", script(500, &[], "broken"));
    let failed = rig.send("DELETE", "/item", &[], "");
    assert_eq!((failed.status, cache(&failed)), (500, "bypass"));
    assert_eq!(
        cache(&rig.get("/item", &[])),
        "hit",
        "an error invalidates nothing"
    );

    rig.origin.set(
        "/item",
        script(
            201,
            &[
                ("location", "/list"),
                ("content-location", "http://other.example.test/elsewhere"),
            ],
            "created",
        ),
    );
    let posted = rig.send("POST", "/item", &[("content-type", "text/plain")], "new");
    assert_eq!((posted.status, cache(&posted)), (201, "bypass"));
    rig.origin.set("/item", script(200, &fresh, "/item"));
    assert_eq!(cache(&rig.get("/item", &[])), "miss");
    assert_eq!(cache(&rig.get("/list", &[])), "miss");
    assert_eq!(
        cache(&rig.get("/elsewhere", &[])),
        "hit",
        "another origin's URL is left alone"
    );
    let series = |reason: &str| {
        rig.metric(&format!(
            "meridian_cache_invalidations_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(series("unsafe_method"), 1.0);
    assert_eq!(series("location"), 1.0);
    assert_eq!(series("content_location"), 0.0);
}

/// RFC 9111 §5.1 / §4.2.3: a hit carries the stored Date and an Age counted from it; an invalid
/// Age makes the response stale; RFC 850 and asctime dates are understood.
fn date_age_and_date_forms(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let then = SystemTime::now() - Duration::from_secs(100);
    let date = http_date(then);
    rig.origin.set(
        "/dated",
        script(
            200,
            &[("cache-control", "max-age=1000"), ("date", &date)],
            "x",
        ),
    );
    assert_eq!(cache(&rig.get("/dated", &[])), "miss");
    let hit = rig.get("/dated", &[]);
    assert_eq!(cache(&hit), "hit");
    assert_eq!(hit.header("date"), Some(date.as_str()), "the stored Date");
    let age: u64 = hit.header("age").and_then(|a| a.parse().ok()).expect("Age");
    assert!((100..1000).contains(&age), "Age {age} counts from Date");

    rig.origin.set(
        "/bad-age",
        script(
            200,
            &[("cache-control", "max-age=600"), ("age", "old, 0")],
            "x",
        ),
    );
    assert_eq!(cache(&rig.get("/bad-age", &[])), "miss");
    assert_eq!(
        cache(&rig.get("/bad-age", &[])),
        "miss",
        "invalid Age: stale"
    );

    // Date in RFC 850 form (wrong case), Expires in asctime form: 10 minutes of freshness.
    let now = time::OffsetDateTime::now_utc();
    let later = now + time::Duration::minutes(10);
    let rfc850 = format!(
        "{}, {:02}-{}-{:02} {:02}:{:02}:{:02} gmt",
        now.weekday().to_string().to_ascii_lowercase(),
        now.day(),
        &now.month().to_string()[..3].to_ascii_uppercase(),
        now.year() % 100,
        now.hour(),
        now.minute(),
        now.second()
    );
    let asctime = format!(
        "{} {} {:>2} {:02}:{:02}:{:02} {}",
        &later.weekday().to_string()[..3],
        &later.month().to_string()[..3],
        later.day(),
        later.hour(),
        later.minute(),
        later.second(),
        later.year()
    );
    rig.origin.set(
        "/forms",
        script(200, &[("date", &rfc850), ("expires", &asctime)], "x"),
    );
    assert_eq!(cache(&rig.get("/forms", &[])), "miss");
    assert_eq!(
        cache(&rig.get("/forms", &[])),
        "hit",
        "Date {rfc850:?} / Expires {asctime:?}"
    );
}

/// A hit's head, however the front writes it (HTTP/1.1 from the entry's prepared header lines,
/// HTTP/2 and HTTP/3 from a header map): every stored field once and in its order, the per-hit
/// fields (`Age`, `x-meridian-cache`, `Content-Length`, the edge's pop) once each, replacing
/// what the origin sent, and a HEAD the same head without the body.
fn hits_carry_each_stored_field_once(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let date = http_date(SystemTime::now() - Duration::from_secs(30));
    rig.origin.set(
        "/fields",
        script(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("date", &date),
                ("etag", "\"v1\""),
                ("link", "</a.css>; rel=preload"),
                ("x-origin", "one"),
                ("link", "</b.js>; rel=preload"),
                ("age", "5"),
            ],
            "stored body",
        ),
    );
    assert_eq!(cache(&rig.get("/fields", &[])), "miss");
    for method in ["GET", "HEAD", "GET"] {
        let hit = rig.send(method, "/fields", &[], "");
        let all = |name: &str| -> Vec<String> {
            hit.headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().expect("visible ASCII").to_string())
                .collect()
        };
        assert_eq!((hit.status, cache(&hit)), (200, "hit"), "{method}");
        assert_eq!(all("date"), std::slice::from_ref(&date));
        assert_eq!(all("etag"), ["\"v1\""]);
        assert_eq!(all("cache-control"), ["max-age=600"]);
        assert_eq!(all("x-origin"), ["one"]);
        assert_eq!(
            all("link"),
            ["</a.css>; rel=preload", "</b.js>; rel=preload"],
            "repeated fields keep their order"
        );
        assert_eq!(all("x-meridian-cache"), ["hit"]);
        assert_eq!(all("content-length"), ["11"], "{method}: the stored length");
        assert_eq!(all("x-meridian-pop").len(), 1);
        assert_eq!(all("x-meridian-region").len(), 1);
        let age = all("age");
        assert_eq!(age.len(), 1, "one Age, not the origin's as well: {age:?}");
        let age: u64 = age[0].parse().expect("Age is a number");
        assert!(
            (30..600).contains(&age),
            "Age {age} counts from the stored Date"
        );
        let body = if method == "HEAD" { "" } else { "stored body" };
        assert_eq!(hit.text(), body, "{method}");
    }
}

/// RFC 9213: CDN-Cache-Control takes precedence over Cache-Control for the edge.
fn cdn_cache_control_wins(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    rig.origin.set(
        "/cdn",
        script(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=600"),
            ],
            "x",
        ),
    );
    let miss = rig.get("/cdn", &[]);
    assert_eq!(cache(&miss), "miss");
    let hit = rig.get("/cdn", &[]);
    assert_eq!(cache(&hit), "hit");
    assert_eq!(
        hit.header("cache-control"),
        Some("no-store"),
        "Cache-Control still reaches clients"
    );
    // RFC 9213 §2.1: the edge, the field's target, consumes it (a relayed miss and a hit alike).
    assert_eq!(miss.header("cdn-cache-control"), None);
    assert_eq!(hit.header("cdn-cache-control"), None);
    rig.origin.set(
        "/cdn-off",
        script(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("cdn-cache-control", "no-store"),
            ],
            "x",
        ),
    );
    assert_eq!(cache(&rig.get("/cdn-off", &[])), "miss");
    assert_eq!(cache(&rig.get("/cdn-off", &[])), "miss");
}

/// RFC 9111 §3: every final status with explicit freshness is reused; heuristic freshness
/// (on by default) for heuristically cacheable codes; Authorization with `public` is shared
/// (§3.5); a POST answer naming its own URL serves GETs (RFC 9110 §9.3.3); If-Modified-Since
/// against an entry without Last-Modified compares with Date.
fn status_codes_authorization_post_and_conditionals(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    for (path, status) in [
        ("/moved", 302),
        ("/teapot", 418),
        ("/oops", 500),
        ("/gone", 410),
    ] {
        rig.origin.set(
            path,
            script(status, &[("cache-control", "max-age=600")], "x"),
        );
        let first = rig.get(path, &[]);
        assert_eq!((first.status, cache(&first)), (status, "miss"), "{path}");
        let second = rig.get(path, &[]);
        assert_eq!((second.status, cache(&second)), (status, "hit"), "{path}");
    }
    // Heuristic: Last-Modified 1000 s before Date gives 100 s.
    let now = SystemTime::now();
    let (date, modified) = (http_date(now), http_date(now - Duration::from_secs(1000)));
    rig.origin.set(
        "/heuristic",
        script(200, &[("date", &date), ("last-modified", &modified)], "x"),
    );
    assert_eq!(cache(&rig.get("/heuristic", &[])), "miss");
    let hit = rig.get("/heuristic", &[]);
    assert_eq!(cache(&hit), "hit");
    assert_eq!(hit.header("warning"), None, "RFC 9111 has no Warning");

    rig.origin.set(
        "/shared",
        script(200, &[("cache-control", "public, max-age=600")], "public"),
    );
    let authorized = rig.get("/shared", &[("authorization", "Bearer u1")]);
    assert_eq!(cache(&authorized), "miss");
    let anonymous = rig.get("/shared", &[]);
    assert_eq!(
        (cache(&anonymous), anonymous.text().as_str()),
        ("hit", "public")
    );
    assert_eq!(
        cache(&rig.get("/shared", &[("authorization", "Bearer u2")])),
        "miss",
        "authorized requests are still answered by the origin"
    );

    rig.origin.set(
        "/form",
        script(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("content-location", "/form"),
            ],
            "posted",
        ),
    );
    rig.send("POST", "/form", &[("content-type", "text/plain")], "a=1");
    let get = rig.get("/form", &[]);
    assert_eq!((cache(&get), get.text().as_str()), ("hit", "posted"));

    let date = http_date(SystemTime::now() - Duration::from_secs(5));
    rig.origin.set(
        "/undated",
        script(
            200,
            &[("cache-control", "max-age=600"), ("date", &date)],
            "x",
        ),
    );
    rig.get("/undated", &[]);
    let conditional = rig.get("/undated", &[("if-modified-since", &date)]);
    assert_eq!((conditional.status, cache(&conditional)), (304, "hit"));
}

/// Interim responses (`102 Processing`, `103 Early Hints`) pass by and are never stored with the
/// final one; hop-by-hop headers (also those `Connection` nominates) are never stored.
fn interim_and_hop_by_hop_are_not_stored(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let mut early = script(
        200,
        &[
            ("cache-control", "max-age=600"),
            ("connection", "x-secret"),
            ("x-secret", "hop"),
        ],
        "final",
    );
    early.interim = vec![
        "HTTP/1.1 102 Processing\r\nx-processing: yes\r\n\r\n".to_string(),
        "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\nx-interim: yes\r\n\r\n"
            .to_string(),
    ];
    rig.origin.set("/hints", early);
    let first = rig.get("/hints", &[]);
    assert_eq!((first.status, first.text().as_str()), (200, "final"));
    let hit = rig.get("/hints", &[]);
    assert_eq!((cache(&hit), hit.text().as_str()), ("hit", "final"));
    for name in ["x-processing", "x-interim", "link", "x-secret"] {
        assert_eq!(hit.header(name), None, "{name} stored");
    }
}

/// RFC 9111 §5.2.2.3: `must-understand` lets a cache that implements the status code store the
/// response despite `no-store`; with a status code it does not know, `no-store` holds. RFC 9111
/// §3.5: a response to a request with `Authorization` is shared only when it says `public`
/// (see the status-code test), `s-maxage` or `must-revalidate`.
fn must_understand_and_authorization_directives(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let understood = [("cache-control", "max-age=600, must-understand, no-store")];
    rig.origin.set("/understood", script(200, &understood, "x"));
    assert_eq!(cache(&rig.get("/understood", &[])), "miss");
    assert_eq!(cache(&rig.get("/understood", &[])), "hit");
    rig.origin
        .set("/unknown-code", script(299, &understood, "x"));
    for _ in 0..2 {
        let reply = rig.get("/unknown-code", &[]);
        assert_eq!((reply.status, cache(&reply)), (299, "miss"));
    }
    for (path, directives, shared) in [
        ("/auth-max-age", "max-age=600", false),
        ("/auth-s-maxage", "s-maxage=600", true),
        (
            "/auth-must-revalidate",
            "max-age=600, must-revalidate",
            true,
        ),
    ] {
        rig.origin
            .set(path, script(200, &[("cache-control", directives)], "a"));
        let authorized = rig.get(path, &[("authorization", "Bearer u1")]);
        assert_eq!(authorized.status, 200, "{directives}");
        let anonymous = rig.get(path, &[]);
        let want = if shared { "hit" } else { "miss" };
        assert_eq!(cache(&anonymous), want, "{directives}");
    }
    assert_eq!(rig.origin.requests_for("/auth-max-age").len(), 2);
    assert_eq!(rig.origin.requests_for("/auth-s-maxage").len(), 1);
}

/// RFC 9111 §5.2.2.2 / §5.2.2.10 / RFC 5861 §4: a stale entry may answer when the origin fails
/// (`stale-if-error`), but never with `must-revalidate` or `s-maxage`; and `s-maxage` outranks
/// `max-age` for a shared cache. The origin's `Age` makes entries stale on arrival, so nothing
/// waits for time to pass.
fn must_revalidate_and_s_maxage(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    for (path, directives, serves_stale) in [
        ("/lenient", "max-age=60, stale-if-error=600", true),
        (
            "/strict",
            "max-age=60, stale-if-error=600, must-revalidate",
            false,
        ),
        ("/shared-strict", "s-maxage=60, stale-if-error=600", false),
    ] {
        let old = [
            ("cache-control", directives),
            ("age", "100"),
            ("etag", "\"v1\""),
        ];
        rig.origin.set(path, script(200, &old, "old"));
        let first = rig.get(path, &[]);
        assert_eq!((first.status, first.text().as_str()), (200, "old"));
        rig.origin.set(path, script(500, &[], "down"));
        let failing = rig.get(path, &[]);
        if serves_stale {
            assert_eq!(
                (failing.status, cache(&failing), failing.text().as_str()),
                (200, "stale", "old"),
                "{directives}"
            );
        } else {
            assert!(failing.status >= 500, "{directives}: {}", failing.status);
            assert_ne!(failing.text(), "old", "{directives}");
        }
    }
    rig.origin.set(
        "/s-maxage",
        script(200, &[("cache-control", "max-age=0, s-maxage=600")], "x"),
    );
    assert_eq!(cache(&rig.get("/s-maxage", &[])), "miss");
    assert_eq!(cache(&rig.get("/s-maxage", &[])), "hit");
    rig.origin.set(
        "/s-maxage-zero",
        script(200, &[("cache-control", "max-age=600, s-maxage=0")], "x"),
    );
    rig.get("/s-maxage-zero", &[]);
    assert_ne!(cache(&rig.get("/s-maxage-zero", &[])), "hit");
    assert_eq!(rig.origin.requests_for("/s-maxage-zero").len(), 2);
}

/// RFC 8297 / RFC 9110 §15.2: an origin's `103 Early Hints` reaches the client while the origin
/// is still working on the final response (it is held back until the client has the hints),
/// over h1, h2 and h3. Hints are never stored (see the interim test above).
fn early_hints_reach_the_client_first(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let gate = Arc::new(tokio::sync::Notify::new());
    let mut hinted = script(200, &[("cache-control", "max-age=600")], "final");
    hinted.interim =
        vec!["HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n".to_string()];
    if matches!(protocol, Secure::H1) {
        // Every interim response is forwarded (RFC 9110 §15.2), not only 103.
        hinted
            .interim
            .insert(0, "HTTP/1.1 102 Processing\r\n\r\n".to_string());
    }
    hinted.gate = Some(Arc::clone(&gate));
    rig.origin.set("/early", hinted);
    match protocol {
        Secure::H1 => rig.world.runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(SocketAddr::new(source_for("US"), 0))
                .expect("bind");
            let mut client = socket.connect(rig.edge.http_addr).await.expect("connect");
            client
                .write_all(
                    format!("GET /early HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("request");
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while find(&got, b"\r\n\r\n").is_none() {
                let n = client.read(&mut chunk).await.expect("read");
                assert!(
                    n > 0,
                    "closed before the hints: {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&chunk[..n]);
            }
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            assert!(text.starts_with("http/1.1 102"), "{text}");
            while find(&got, b"103").is_none() || !got.ends_with(b"\r\n\r\n") {
                let n = client.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed before the hints: {text}");
                got.extend_from_slice(&chunk[..n]);
            }
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            assert!(text.contains("\r\n\r\nhttp/1.1 103"), "{text}");
            assert!(text.contains("link: </style.css>; rel=preload"), "{text}");
            // Only now may the origin answer.
            gate.notify_one();
            client.read_to_end(&mut got).await.expect("final");
            let text = String::from_utf8_lossy(&got);
            let final_at = text.find("HTTP/1.1 200").expect("final response");
            assert!(final_at > 0 && text.ends_with("final"), "{text}");
        }),
        Secure::H3 => rig.world.runtime.block_on(async {
            let tls = rig.world.tls.as_ref().expect("tls");
            let config = meridian_tests::h3client::client_config(tls.roots()).expect("h3 config");
            let mut endpoint =
                quinn::Endpoint::client(SocketAddr::new(source_for("US"), 0)).expect("udp");
            endpoint.set_default_client_config(config);
            let connection = endpoint
                .connect(rig.edge.https_addr.expect("https"), HOST)
                .expect("connect")
                .await
                .expect("QUIC handshake");
            let (mut driver, mut sender) = ::h3::client::new(h3_quinn::Connection::new(connection))
                .await
                .expect("h3");
            tokio::spawn(async move {
                let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            });
            let request = http::Request::get(format!("https://{HOST}/early"))
                .body(())
                .expect("request");
            let mut stream = sender.send_request(request).await.expect("stream");
            stream.finish().await.expect("finish");
            let hints = stream.recv_response().await.expect("hints");
            assert_eq!(hints.status(), 103);
            assert_eq!(
                hints.headers().get("link").and_then(|v| v.to_str().ok()),
                Some("</style.css>; rel=preload")
            );
            gate.notify_one();
            let done = stream.recv_response().await.expect("final");
            assert_eq!(done.status(), 200);
            let mut body = Vec::new();
            while let Ok(Some(mut data)) = stream.recv_data().await {
                use bytes::Buf;
                while data.has_remaining() {
                    let part = data.chunk().to_vec();
                    data.advance(part.len());
                    body.extend_from_slice(&part);
                }
            }
            assert_eq!(body, b"final");
            endpoint.close(0u32.into(), b"done");
        }),
        Secure::H2 => rig.world.runtime.block_on(async {
            let tls = rig.world.tls.as_ref().expect("tls");
            let config = secure::tcp_client_config(tls.roots(), &[b"h2"]);
            let stream = secure::tls_connect(
                source_for("US"),
                rig.edge.https_addr.expect("https"),
                HOST,
                config,
            )
            .await
            .expect("TLS");
            let (client, connection) = ::h2::client::handshake(stream).await.expect("h2");
            tokio::spawn(connection);
            let mut client = client.ready().await.expect("ready");
            let request = http::Request::get(format!("https://{HOST}/early"))
                .body(())
                .expect("request");
            let (mut response, _) = client.send_request(request, true).expect("send");
            let hints = std::future::poll_fn(|cx| response.poll_informational(cx))
                .await
                .expect("an interim response")
                .expect("hints");
            assert_eq!(hints.status(), 103);
            assert_eq!(
                hints.headers().get("link").and_then(|v| v.to_str().ok()),
                Some("</style.css>; rel=preload")
            );
            gate.notify_one();
            let done = response.await.expect("final");
            assert_eq!(done.status(), 200);
            let mut body = done.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                got.extend_from_slice(&chunk.expect("body"));
            }
            assert_eq!(got, b"final");
        }),
    }
    let hit = rig.get("/early", &[]);
    assert_eq!((cache(&hit), hit.header("link")), ("hit", None));
}

/// RFC 9110 §14: byte ranges cut from a complete stored 200 (206 + Content-Range), 416 when
/// unsatisfiable.
fn ranges_from_stored_responses(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let body: String = (0..1000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    rig.origin.set(
        "/blob",
        script(
            200,
            &[("cache-control", "max-age=600"), ("etag", "\"b1\"")],
            &body,
        ),
    );
    assert_eq!(cache(&rig.get("/blob", &[])), "miss");
    for (spec, from, to) in [
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=995-5000", 995, 999),
    ] {
        let reply = rig.get("/blob", &[("range", spec)]);
        assert_eq!((reply.status, cache(&reply)), (206, "hit"), "{spec}");
        assert_eq!(reply.text(), body[from..=to], "{spec}");
        let want = format!("bytes {from}-{to}/1000");
        assert_eq!(reply.header("content-range"), Some(want.as_str()), "{spec}");
    }
    let unsatisfiable = rig.get("/blob", &[("range", "bytes=1000-")]);
    assert_eq!(unsatisfiable.status, 416);
    assert_eq!(unsatisfiable.header("content-range"), Some("bytes */1000"));
    let if_range = rig.get("/blob", &[("range", "bytes=0-0"), ("if-range", "\"b0\"")]);
    assert_eq!((if_range.status, if_range.body.len()), (200, 1000));
    assert_eq!(rig.origin.requests_for("/blob").len(), 1);
}

/// One part of a `multipart/byteranges` body: its `Content-Type`, `Content-Range` and bytes.
type Part = (Option<String>, String, Vec<u8>);

/// A `multipart/byteranges` reply (RFC 9110 §14.6) taken apart by hand, checking the framing
/// (first delimiter, CRLF before every later one, close delimiter) and the declared length.
fn byteranges(reply: &Reply) -> Vec<Part> {
    let boundary = reply
        .header("content-type")
        .and_then(|t| t.strip_prefix("multipart/byteranges; boundary="))
        .expect("multipart/byteranges with a boundary")
        .to_string();
    if let Some(length) = reply.header("content-length") {
        assert_eq!(length, reply.body.len().to_string(), "Content-Length");
    }
    assert!(
        reply.header("content-range").is_none(),
        "only parts carry it"
    );
    let open = format!("--{boundary}");
    let between = format!("\r\n--{boundary}");
    let body = &reply.body[..];
    assert!(body.starts_with(open.as_bytes()), "starts with a delimiter");
    let mut rest = &body[open.len()..];
    let mut parts = Vec::new();
    while rest != b"--\r\n" {
        let part = rest
            .strip_prefix(b"\r\n")
            .expect("a delimiter ends its line");
        let head_end = find(part, b"\r\n\r\n").expect("part fields");
        let (mut content_type, mut content_range) = (None, None);
        for line in String::from_utf8_lossy(&part[..head_end]).split("\r\n") {
            let (name, value) = line.split_once(':').expect("a field");
            match name.to_ascii_lowercase().as_str() {
                "content-type" => content_type = Some(value.trim().to_string()),
                "content-range" => content_range = Some(value.trim().to_string()),
                other => panic!("unexpected part field {other}"),
            }
        }
        let data = &part[head_end + 4..];
        let next = find(data, between.as_bytes()).expect("next delimiter");
        parts.push((
            content_type,
            content_range.expect("Content-Range in every part"),
            data[..next].to_vec(),
        ));
        rest = &data[next + between.len()..];
    }
    parts
}

/// The part `start..=end` of a `len`-byte `text/plain` body.
fn part(body: &str, start: usize, end: usize) -> Part {
    (
        Some("text/plain".into()),
        format!("bytes {start}-{end}/{}", body.len()),
        body.as_bytes()[start..=end].to_vec(),
    )
}

/// RFC 9110 §14.1.2 / §14.6 / §14.2: several ranges (any of the three forms) from a complete
/// stored response as one `multipart/byteranges` 206, parts in the order asked; overlapping or
/// adjacent ranges coalesced; a single satisfiable range as a plain 206; none satisfiable 416;
/// `If-Range`; more ranges than `max_ranges` get the whole 200. The origin is asked once.
fn several_ranges_from_stored_responses(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    let body = blob(1000);
    let headers = [
        ("cache-control", "max-age=600"),
        ("etag", "\"m1\""),
        ("content-type", "text/plain"),
    ];
    rig.origin.set("/multi", script(200, &headers, &body));
    assert_eq!(cache(&rig.get("/multi", &[])), "miss");

    let two = rig.get("/multi", &[("range", "bytes=0-9,20-29")]);
    assert_eq!((two.status, cache(&two)), (206, "hit"));
    assert_eq!(byteranges(&two), [part(&body, 0, 9), part(&body, 20, 29)]);
    // Open and suffix ranges mixed in; -20 lies inside 980- and merges with it.
    let mixed = rig.get("/multi", &[("range", "bytes=990-,-20, 0-1,500-509")]);
    assert_eq!(mixed.status, 206);
    assert_eq!(
        byteranges(&mixed),
        [
            part(&body, 980, 999),
            part(&body, 0, 1),
            part(&body, 500, 509)
        ]
    );
    // Overlapping and adjacent ranges collapse into one: a plain 206.
    let merged = rig.get("/multi", &[("range", "bytes=0-9,5-14,15-19")]);
    assert_eq!(merged.status, 206);
    assert_eq!(merged.header("content-range"), Some("bytes 0-19/1000"));
    assert_eq!(merged.text(), body[0..=19]);
    // One satisfiable range among unsatisfiable ones: a plain 206 as well.
    let one = rig.get("/multi", &[("range", "bytes=5000-,10-19")]);
    assert_eq!(one.status, 206);
    assert_eq!(one.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(one.text(), body[10..=19]);
    // None satisfiable.
    let none = rig.get("/multi", &[("range", "bytes=1000-,2000-3000")]);
    assert_eq!(none.status, 416);
    assert_eq!(none.header("content-range"), Some("bytes */1000"));
    // If-Range: the parts when the validator matches, the whole response when not.
    let matching = rig.get(
        "/multi",
        &[("range", "bytes=0-0,2-2"), ("if-range", "\"m1\"")],
    );
    assert_eq!(
        byteranges(&matching),
        [part(&body, 0, 0), part(&body, 2, 2)]
    );
    let changed = rig.get(
        "/multi",
        &[("range", "bytes=0-0,2-2"), ("if-range", "\"m0\"")],
    );
    assert_eq!((changed.status, changed.text()), (200, body.clone()));
    // The range limit (16 by default): 16 small ranges are answered, 17 get the whole 200.
    let spec = |n: usize| {
        let list: Vec<String> = (0..n).map(|i| format!("{0}-{0}", i * 10)).collect();
        format!("bytes={}", list.join(","))
    };
    let sixteen = rig.get("/multi", &[("range", &spec(16))]);
    assert_eq!(sixteen.status, 206);
    assert_eq!(byteranges(&sixteen).len(), 16);
    let seventeen = rig.get("/multi", &[("range", &spec(17))]);
    assert_eq!((seventeen.status, cache(&seventeen)), (200, "hit"));
    assert_eq!(seventeen.text(), body);
    assert_eq!(rig.origin.requests_for("/multi").len(), 1);

    // A content-coded entry: one range is cut, several get the whole coded response.
    let coded = [
        ("cache-control", "max-age=600"),
        ("content-encoding", "gzip"),
    ];
    rig.origin.set("/coded", script(200, &coded, &body));
    let gzip = ("accept-encoding", "gzip");
    assert_eq!(cache(&rig.get("/coded", &[gzip])), "miss");
    let one = rig.get("/coded", &[gzip, ("range", "bytes=0-9")]);
    assert_eq!((one.status, cache(&one)), (206, "hit"));
    let several = rig.get("/coded", &[gzip, ("range", "bytes=0-9,20-29")]);
    assert_eq!((several.status, cache(&several)), (200, "hit"));
    assert_eq!(several.body.len(), 1000);
}

/// A long body whose every byte says where it is.
fn blob(len: usize) -> String {
    (0..len)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect()
}

/// RFC 9110 §14 / RFC 9111 §3.4 by the whole-fetch route: a `Range` miss asks the origin for the
/// whole response (no `Range` upstream), answers the client's range from it as it streams
/// (`206`, or `416`), and stores it, so every later range is a hit; `If-Range` is checked
/// against what came back. Objects over `max_object_bytes` still get their range, unstored.
/// With `fill_ranges = false` the range goes to the origin untouched.
fn range_misses_fill_the_cache(protocol: Secure) {
    let edge = rig_with(protocol, |_| {}, |c| c.edge.cache.max_object_bytes = 4096);
    let body = blob(1000);
    let fresh = [("cache-control", "max-age=600"), ("etag", "\"f1\"")];
    edge.origin.set("/fill", script(200, &fresh, &body));
    let first = edge.get("/fill", &[("range", "bytes=5-9")]);
    assert_eq!((first.status, cache(&first)), (206, "miss"));
    assert_eq!(first.text(), body[5..=9]);
    assert_eq!(first.header("content-range"), Some("bytes 5-9/1000"));
    let seen = edge.origin.requests_for("/fill");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("range"),
        None,
        "the whole response is fetched"
    );
    for (spec, from, to) in [("bytes=-5", 995, 999), ("bytes=0-0", 0, 0)] {
        let hit = edge.get("/fill", &[("range", spec)]);
        assert_eq!((hit.status, cache(&hit)), (206, "hit"), "{spec}");
        assert_eq!(hit.text(), body[from..=to], "{spec}");
    }
    let whole = edge.get("/fill", &[]);
    assert_eq!((cache(&whole), whole.text()), ("hit", body.clone()));
    assert_eq!(edge.origin.requests_for("/fill").len(), 1);

    // Nothing of the range exists: 416 at once, and the response is stored all the same.
    edge.origin.set("/short", script(200, &fresh, "tiny"));
    let past = edge.get("/short", &[("range", "bytes=100-")]);
    assert_eq!((past.status, cache(&past)), (416, "miss"));
    assert_eq!(past.header("content-range"), Some("bytes */4"));
    assert!(past.body.is_empty());
    let stored = edge.get("/short", &[]);
    assert_eq!((cache(&stored), stored.text().as_str()), ("hit", "tiny"));

    // If-Range naming another validator: the whole (new) response, RFC 9110 §13.1.5.
    edge.origin.set("/changed", script(200, &fresh, &body));
    let moved = edge.get(
        "/changed",
        &[("range", "bytes=0-1"), ("if-range", "\"f0\"")],
    );
    assert_eq!((moved.status, moved.body.len()), (200, 1000));

    // Larger than max_object_bytes: the range streams to the client, nothing is stored.
    let large = blob(10_000);
    edge.origin.set("/large", script(200, &fresh, &large));
    for _ in 0..2 {
        let part = edge.get("/large", &[("range", "bytes=100-199")]);
        assert_eq!((part.status, cache(&part)), (206, "miss"));
        assert_eq!(part.text(), large[100..=199]);
    }
    assert_eq!(edge.origin.requests_for("/large").len(), 2);

    // Several ranges fill the same way: their parts stream as the whole response arrives.
    let typed = [
        ("cache-control", "max-age=600"),
        ("etag", "\"f1\""),
        ("content-type", "text/plain"),
    ];
    edge.origin.set("/parts", script(200, &typed, &body));
    let first = edge.get("/parts", &[("range", "bytes=0-1,500-,-3")]);
    assert_eq!((first.status, cache(&first)), (206, "miss"));
    assert_eq!(
        byteranges(&first),
        [part(&body, 0, 1), part(&body, 500, 999)]
    );
    assert_eq!(edge.origin.requests_for("/parts")[0].header("range"), None);
    let again = edge.get("/parts", &[("range", "bytes=0-1,500-,-3")]);
    assert_eq!((again.status, cache(&again)), (206, "hit"));
    assert_eq!(byteranges(&again), byteranges(&first));
    // Parts asked in descending order cannot be sent while the body streams: the miss gets the
    // whole response (RFC 9110 §14.2), stored, and the next request its parts in its order.
    edge.origin.set("/backwards", script(200, &typed, &body));
    let descending = [("range", "bytes=10-19,0-1")];
    let whole = edge.get("/backwards", &descending);
    assert_eq!((whole.status, cache(&whole)), (200, "miss"));
    assert_eq!(whole.text(), body);
    let parts = edge.get("/backwards", &descending);
    assert_eq!((parts.status, cache(&parts)), (206, "hit"));
    assert_eq!(byteranges(&parts), [part(&body, 10, 19), part(&body, 0, 1)]);
    // Too large to store: the parts still stream, nothing is kept.
    edge.origin.set("/large-parts", script(200, &typed, &large));
    let big = edge.get("/large-parts", &[("range", "bytes=0-9,9000-9009")]);
    assert_eq!((big.status, cache(&big)), (206, "miss"));
    assert_eq!(
        byteranges(&big),
        [part(&large, 0, 9), part(&large, 9000, 9009)]
    );

    let passing = rig(protocol, |c| c.fill_ranges = false);
    passing.origin.set("/p", script(200, &fresh, &body));
    let ranged = passing.get("/p", &[("range", "bytes=0-9")]);
    assert_eq!(cache(&ranged), "bypass");
    assert_eq!(
        passing.origin.requests_for("/p")[0].header("range"),
        Some("bytes=0-9"),
        "fill_ranges = false: the range goes to the origin"
    );
}

/// RFC 9111 §4.2.2: heuristic freshness is on by default (see the status-code test) and
/// `heuristic = false` turns it off for a route.
fn heuristic_freshness_can_be_turned_off(protocol: Secure) {
    let rig = rig(protocol, |c| c.heuristic = false);
    let now = SystemTime::now();
    let (date, modified) = (http_date(now), http_date(now - Duration::from_secs(1000)));
    rig.origin.set(
        "/heuristic",
        script(200, &[("date", &date), ("last-modified", &modified)], "x"),
    );
    assert_eq!(cache(&rig.get("/heuristic", &[])), "miss");
    assert_eq!(
        cache(&rig.get("/heuristic", &[])),
        "miss",
        "no freshness: not stored"
    );
}

/// RFC 9213 §2.1: with `[edge.cache] forward_targeted = true` the targeted field reaches clients.
fn targeted_fields_forwarded_when_configured(protocol: Secure) {
    let rig = rig_with(protocol, |_| {}, |c| c.edge.cache.forward_targeted = true);
    rig.origin.set(
        "/cdn",
        script(200, &[("cdn-cache-control", "max-age=600")], "x"),
    );
    let miss = rig.get("/cdn", &[]);
    let hit = rig.get("/cdn", &[]);
    assert_eq!((cache(&miss), cache(&hit)), ("miss", "hit"));
    assert_eq!(miss.header("cdn-cache-control"), Some("max-age=600"));
    assert_eq!(hit.header("cdn-cache-control"), Some("max-age=600"));
}

/// RFC 9110 §12.5.3: Accept-Encoding variants are the set of accepted codings (order, case,
/// q-values, `x-gzip`), and a stored coding never reaches a client that does not accept it, even
/// from an origin that forgot `Vary: Accept-Encoding`.
fn accept_encoding_is_normalised(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    rig.origin.set(
        "/enc",
        script(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("vary", "Accept-Encoding"),
                ("content-encoding", "gzip"),
            ],
            "gz",
        ),
    );
    assert_eq!(
        cache(&rig.get("/enc", &[("accept-encoding", "gzip, br")])),
        "miss"
    );
    for same in ["br;q=0.5, GZIP", "x-gzip, br, identity"] {
        let hit = rig.get("/enc", &[("accept-encoding", same)]);
        assert_eq!(
            (cache(&hit), hit.header("content-encoding")),
            ("hit", Some("gzip")),
            "{same}"
        );
    }
    assert_eq!(
        cache(&rig.get("/enc", &[("accept-encoding", "gzip")])),
        "miss",
        "another set"
    );

    rig.origin.set(
        "/no-vary",
        script(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("content-encoding", "gzip"),
            ],
            "gz",
        ),
    );
    assert_eq!(
        cache(&rig.get("/no-vary", &[("accept-encoding", "gzip")])),
        "miss"
    );
    assert_eq!(
        cache(&rig.get("/no-vary", &[("accept-encoding", "gzip")])),
        "hit"
    );
    let refused = rig.get("/no-vary", &[("accept-encoding", "br")]);
    assert_eq!(
        cache(&refused),
        "miss",
        "gzip is not served to a br-only client"
    );
    assert_eq!(rig.origin.requests_for("/no-vary").len(), 2);
}

/// RFC 9110 §12.5.4: Accept-Language variants match whatever the order, case and spacing; with
/// `key.normalise_vary = false` the varied fields are compared as sent.
fn accept_language_is_normalised(protocol: Secure) {
    let rig = rig(protocol, |_| {});
    rig.origin.set(
        "/lang",
        script(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("vary", "Accept-Language"),
            ],
            "english",
        ),
    );
    let first = rig.get("/lang", &[("accept-language", "en-US, de;q=0.5")]);
    assert_eq!(cache(&first), "miss");
    let same = rig.get("/lang", &[("accept-language", "DE; q=0.5,en-us")]);
    assert_eq!(cache(&same), "hit");
    let other = rig.get("/lang", &[("accept-language", "de, en-US;q=0.5")]);
    assert_eq!(
        cache(&other),
        "miss",
        "different weights are another variant"
    );

    // `key.normalise_vary = false`: the field as sent picks the variant.
    let raw = crate::rig(protocol, |c| c.key.normalise_vary = false);
    raw.origin.set(
        "/lang",
        script(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("vary", "Accept-Language, Accept-Encoding"),
            ],
            "english",
        ),
    );
    let ask = |language: &str, encoding: &str| {
        cache(&raw.get(
            "/lang",
            &[("accept-language", language), ("accept-encoding", encoding)],
        ))
        .to_string()
    };
    assert_eq!(ask("en-US, de;q=0.5", "gzip"), "miss");
    assert_eq!(ask("en-US, de;q=0.5", "gzip"), "hit");
    assert_eq!(ask("DE; q=0.5,en-us", "gzip"), "miss");
    assert_eq!(ask("en-US, de;q=0.5", "GZIP"), "miss");
}

macro_rules! conformance {
    ($($proto:ident => $value:expr),* $(,)?) => {
        $(
            mod $proto {
                use super::*;

                #[test]
                fn cookie_requests_cannot_poison_the_cache() {
                    cookie_requests_cannot_poison($value);
                }

                #[test]
                fn set_cookie_is_stored_only_when_the_route_allows_it() {
                    set_cookie_is_stored_only_when_allowed($value);
                }

                #[test]
                fn a_304_never_stores_set_cookie_and_unstorable_entries_go() {
                    revalidation_never_stores_set_cookie($value);
                }

                #[test]
                fn unsafe_methods_invalidate_the_url_and_its_locations() {
                    unsafe_methods_invalidate($value);
                }

                #[test]
                fn stored_date_with_age_invalid_age_and_all_date_forms() {
                    date_age_and_date_forms($value);
                }

                #[test]
                fn hits_carry_each_stored_field_once() {
                    super::hits_carry_each_stored_field_once($value);
                }

                #[test]
                fn cdn_cache_control_takes_precedence() {
                    cdn_cache_control_wins($value);
                }

                #[test]
                fn status_codes_authorization_post_and_if_modified_since() {
                    status_codes_authorization_post_and_conditionals($value);
                }

                #[test]
                fn must_understand_and_authorization_directives_are_honoured() {
                    must_understand_and_authorization_directives($value);
                }

                #[test]
                fn must_revalidate_and_s_maxage_are_honoured() {
                    must_revalidate_and_s_maxage($value);
                }

                #[test]
                fn interim_and_hop_by_hop_headers_are_not_stored() {
                    interim_and_hop_by_hop_are_not_stored($value);
                }

                #[test]
                fn byte_ranges_are_served_from_stored_responses() {
                    ranges_from_stored_responses($value);
                }

                #[test]
                fn accept_language_variants_are_normalised() {
                    accept_language_is_normalised($value);
                }

                #[test]
                fn several_byte_ranges_are_multipart_from_stored_responses() {
                    several_ranges_from_stored_responses($value);
                }

                #[test]
                fn range_misses_fill_the_cache_and_answer_from_it() {
                    range_misses_fill_the_cache($value);
                }

                #[test]
                fn heuristic_freshness_is_on_unless_turned_off() {
                    heuristic_freshness_can_be_turned_off($value);
                }

                #[test]
                fn targeted_fields_reach_clients_only_when_forwarded() {
                    targeted_fields_forwarded_when_configured($value);
                }

                #[test]
                fn accept_encoding_variants_are_normalised() {
                    accept_encoding_is_normalised($value);
                }

                #[test]
                fn early_hints_reach_the_client_before_the_final_response() {
                    early_hints_reach_the_client_first($value);
                }
            }
        )*
    };
}

conformance!(h1 => Secure::H1, h2 => Secure::H2, h3 => Secure::H3);
