//! The HTTP API end to end: `lb run` with `agent.api_listen` in a small
//! data center's balancer namespace, every route called through a real HTTP
//! client (ureq), every answer validated against the JSON Schema the
//! OpenAPI document gives it, the document itself parsed as OpenAPI 3.1.
//! Tokens: none or a wrong one is 401, a read-only one on a change is 403,
//! the file is read again when it changes. An edit through the API is seen
//! by the CLI and in the config file.

mod support;

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_tests::{Netns, backend_addr, dc};
use lb_user::api::BackendInfo;
use serde_json::{Value, json};
use support::{Agent, servers};

const RW: &str = "0123456789abcdef0123456789abcdef-rw";
const RO: &str = "0123456789abcdef0123456789abcdef-ro";
const VIP: &str = "198.18.0.100:8080/tcp";

/// The token file, removed when the test ends however it ends.
struct TokenFile(PathBuf);

impl TokenFile {
    fn write(&self, text: &str, mode: u32) {
        std::fs::write(&self.0, text).expect("token file");
        std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One answer: status, `WWW-Authenticate`, JSON body.
struct Answer {
    status: u16,
    challenge: Option<String>,
    body: Value,
}

/// A real HTTP client calling the agent's API inside the balancer's
/// namespace (its 127.0.0.1 is the agent's).
struct Client<'a> {
    ns: &'a Netns,
    http: ureq::Agent,
}

impl Client<'_> {
    fn call(
        &self,
        method: &str,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Answer {
        let url = format!("http://127.0.0.1:9200{path_and_query}");
        self.ns
            .enter(|| {
                let auth = token.map(|t| format!("Bearer {t}"));
                let resp = match method {
                    "get" => {
                        let mut r = self.http.get(&url);
                        if let Some(a) = &auth {
                            r = r.header("Authorization", a);
                        }
                        r.call()
                    }
                    "post" => {
                        let mut r = self.http.post(&url);
                        if let Some(a) = &auth {
                            r = r.header("Authorization", a);
                        }
                        match body {
                            Some(b) => r.send_json(b),
                            None => r.send_empty(),
                        }
                    }
                    m => panic!("method {m}"),
                };
                let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
                Answer {
                    status: resp.status().as_u16(),
                    challenge: resp
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                    body: resp.body_mut().read_json().expect("a JSON answer"),
                }
            })
            .expect("enter the balancer's namespace")
    }
}

/// Where `body` departs from the schema the document gives `method
/// path`'s answer with `status` (refs resolved within the document).
fn schema_errors(doc: &Value, method: &str, path: &str, status: u16, body: &Value) -> Vec<String> {
    let esc = |s: &str| s.replace('~', "~0").replace('/', "~1");
    if status != 200 {
        let code = status.to_string();
        if doc["paths"][path][method]["responses"][code.as_str()].is_null() {
            return vec![format!(
                "status {status} is not declared for {method} {path}"
            )];
        }
    }
    let pointer = if status == 200 {
        format!(
            "#/paths/{}/{method}/responses/200/content/application~1json/schema",
            esc(path)
        )
    } else {
        "#/components/schemas/Error".to_string()
    };
    let mut root = doc.clone();
    root["$ref"] = pointer.clone().into();
    let v = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("the schema at {pointer} compiles: {e}"));
    v.iter_errors(body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

fn check_schema(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let errors = schema_errors(doc, method, path, status, body);
    assert!(
        errors.is_empty(),
        "{method} {path} → {status}: the answer does not match its schema: {errors:?}\n{body:#}"
    );
}

#[test]
fn every_route_answers_as_its_openapi_document_says_with_tokens_checked() {
    let d = dc("hapi", 3).expect("dc");
    let _srv = servers(&d);
    let tokens =
        TokenFile(std::env::temp_dir().join(format!("lb-api-tokens-{}", std::process::id())));
    tokens.write(
        &format!("# test tokens\nread-write {RW} deployer\nread-only {RO} dashboard\n"),
        0o600,
    );
    let tfile = tokens.0.display().to_string();
    let agent = Agent::start_edited("hapi", &d, 3, |f| {
        f.agent.api_listen = Some("127.0.0.1:9200".into());
        f.agent.api_token_file = Some(tfile.clone());
        f.announce = Some(lb_user::config::file::Announce { table: 201 });
    });
    let c = Client {
        ns: &d.lb,
        http: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into(),
    };

    // The document: served without a token, the checked-in file, valid
    // OpenAPI 3.1.
    let a = c.call("get", "/api/openapi.json", None, None);
    assert_eq!(a.status, 200);
    let doc = a.body;
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/openapi.json"))
            .expect("dist/openapi.json");
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(&file).unwrap(),
        "the agent serves the checked-in document"
    );
    let spec = oas3::from_json(&file).expect("a valid OpenAPI 3.1 document");
    assert!(spec.openapi.starts_with("3.1"), "{}", spec.openapi);
    let mut routes: BTreeSet<(String, String)> = BTreeSet::new();
    for (path, item) in spec.paths.iter().flatten() {
        for (m, _) in item.methods() {
            routes.insert((m.as_str().to_lowercase(), path.clone()));
        }
    }
    assert!(routes.len() >= 12, "{routes:?}");
    // The schemas bite: a status whose counts are text, a backend list
    // with an unknown state, an error without its text.
    let status = "/api/v1/status";
    assert!(
        !schema_errors(
            &doc,
            "get",
            status,
            200,
            &json!({"ok": true, "data": {"vips": "1"}})
        )
        .is_empty()
    );
    let bad = json!({"ok": true, "data": [{"state": "sleeping"}]});
    assert!(!schema_errors(&doc, "get", "/api/v1/health", 200, &bad).is_empty());
    assert!(!schema_errors(&doc, "get", status, 401, &json!({"ok": false})).is_empty());
    let mut called: BTreeSet<(String, String)> = BTreeSet::new();
    called.insert(("get".into(), "/api/openapi.json".into()));

    // Every read route with the read-only token, its answer as documented.
    let b3 = backend_addr(3);
    let reads: Vec<(&str, String, Option<Value>)> = vec![
        ("get", "/api/v1/status".into(), None),
        ("get", "/api/v1/vips".into(), None),
        ("get", format!("/api/v1/backends?vip={VIP}"), None),
        ("get", "/api/v1/health".into(), None),
        ("get", "/api/v1/stats".into(), None),
        (
            "get",
            format!("/api/v1/explain?vip={VIP}&client=198.18.1.1:40000"),
            None,
        ),
        (
            "post",
            "/api/v1/what-if".into(),
            Some(json!({"edit": "backend-remove", "vip": VIP, "address": b3})),
        ),
    ];
    let mut answers = std::collections::HashMap::new();
    for (m, pq, body) in &reads {
        let a = c.call(m, pq, Some(RO), body.as_ref());
        let path = pq.split('?').next().unwrap();
        assert_eq!(a.status, 200, "{m} {pq}: {}", a.body);
        check_schema(&doc, m, path, a.status, &a.body);
        called.insert((m.to_string(), path.to_string()));
        answers.insert(path.to_string(), a.body["data"].clone());
    }
    // The same data as the CLI's.
    let mut api_backends: Vec<BackendInfo> =
        serde_json::from_value(answers["/api/v1/backends"].clone()).expect("backends");
    let mut cli_backends = agent.backends();
    let key = |b: &BackendInfo| (b.address, b.state.name());
    api_backends.sort_by_key(key);
    cli_backends.sort_by_key(key);
    assert_eq!(
        api_backends.iter().map(key).collect::<Vec<_>>(),
        cli_backends.iter().map(key).collect::<Vec<_>>()
    );
    assert!(
        answers["/api/v1/what-if"]["flows"]["total"]
            .as_u64()
            .is_some()
    );
    assert_eq!(answers["/api/v1/status"]["vips"], 1);

    // No token, a wrong one: 401 with a Bearer challenge; nothing read.
    for tok in [None, Some("not-a-token-not-a-token-not-a-token")] {
        let a = c.call("get", "/api/v1/status", tok, None);
        assert_eq!(a.status, 401, "{}", a.body);
        assert!(a.challenge.as_deref().unwrap_or("").starts_with("Bearer"));
        check_schema(&doc, "get", "/api/v1/status", 401, &a.body);
        assert!(a.body.get("data").is_none_or(Value::is_null));
    }

    // A change with the read-only token: 403, the file untouched.
    let before = std::fs::read_to_string(&agent.config).unwrap();
    let b9 = "198.18.2.99";
    let add = json!({"edit": "backend-add", "vip": VIP, "address": b9, "weight": 2});
    let a = c.call("post", "/api/v1/edit", Some(RO), Some(&add));
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(
        a.body["error"].as_str().unwrap().contains("dashboard"),
        "{}",
        a.body
    );
    check_schema(&doc, "post", "/api/v1/edit", 403, &a.body);
    assert_eq!(std::fs::read_to_string(&agent.config).unwrap(), before);

    // The same change with the read-write token: applied, seen by the CLI
    // and in the file.
    let a = c.call("post", "/api/v1/edit", Some(RW), Some(&add));
    assert_eq!(a.status, 200, "{}", a.body);
    check_schema(&doc, "post", "/api/v1/edit", 200, &a.body);
    called.insert(("post".into(), "/api/v1/edit".into()));
    let b = agent
        .backends()
        .into_iter()
        .find(|b| b.address.to_string() == b9)
        .expect("the CLI lists the backend added through the API");
    assert_eq!(b.weight, 2);
    let text = std::fs::read_to_string(&agent.config).unwrap();
    assert!(
        text.contains(b9) && text.contains("# test agent"),
        "saved, comments kept:\n{text}"
    );
    assert_eq!(
        agent.events(&[("token", "deployer")]).len(),
        1,
        "the change is logged with its token's name"
    );

    // A refused change: 400 with the CLI's error; a malformed body: 400.
    let gone = json!({"edit": "backend-remove", "vip": VIP, "address": "198.18.2.98"});
    let a = c.call("post", "/api/v1/edit", Some(RW), Some(&gone));
    assert_eq!(a.status, 400, "{}", a.body);
    check_schema(&doc, "post", "/api/v1/edit", 400, &a.body);
    let cli_err = agent
        .cli(&["backend", "remove", VIP, "198.18.2.98"])
        .expect_err("refused by the CLI too");
    let api_err = a.body["error"].as_str().unwrap();
    assert!(
        cli_err.contains(api_err),
        "the CLI says what the API says:\n{cli_err}\n{api_err}"
    );
    let a = c.call(
        "post",
        "/api/v1/edit",
        Some(RW),
        Some(&json!({"edit": "backend-add"})),
    );
    assert_eq!(a.status, 400);
    assert!(
        a.body["error"].as_str().unwrap().contains("not an edit"),
        "{}",
        a.body
    );
    let a = c.call("get", "/api/v1/backends?vip=nope", Some(RO), None);
    assert_eq!(a.status, 400);
    let a = c.call("get", "/api/v1/nothing", Some(RO), None);
    assert_eq!(a.status, 404);

    // The other changes.
    for path in [
        "/api/v1/reload",
        "/api/v1/node/drain",
        "/api/v1/node/resume",
    ] {
        let a = c.call("post", path, Some(RW), None);
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        check_schema(&doc, "post", path, 200, &a.body);
        called.insert(("post".into(), path.into()));
    }

    // The token file is read again when it changes: the read-only token
    // revoked, then a file open to others refuses everything (503).
    tokens.write(&format!("read-write {RW} deployer\n"), 0o600);
    assert_eq!(c.call("get", "/api/v1/status", Some(RO), None).status, 401);
    assert_eq!(c.call("get", "/api/v1/status", Some(RW), None).status, 200);
    tokens.write(&format!("read-write {RW} deployer\n"), 0o644);
    let a = c.call("get", "/api/v1/status", Some(RW), None);
    assert_eq!(a.status, 503, "{}", a.body);
    // The reason is in the log, not in the answer to a client.
    assert!(
        a.body["error"]
            .as_str()
            .unwrap()
            .contains("the agent's log says why"),
        "{}",
        a.body
    );
    assert!(
        agent.log_text().contains("chmod 600"),
        "the log says what to do"
    );
    tokens.write(&format!("read-write {RW} deployer\n"), 0o600);

    // Last, the agent stops on request (the datapath stays).
    let a = c.call("post", "/api/v1/shutdown", Some(RW), None);
    assert_eq!(a.status, 200, "{}", a.body);
    called.insert(("post".into(), "/api/v1/shutdown".into()));
    let t0 = Instant::now();
    while lb_user::api::call(&agent.socket, &lb_user::api::Request::Status).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the agent stops on /api/v1/shutdown"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(called, routes, "every route of the document was called");
}
