//! The configuration's unit tests: every error message a person reads,
//! the defaults, and the shipped example.

use super::*;

const GOOD: &str = r#"
[agent]
interface = "eth1"

[[vip]]
address = "198.18.0.100"
port = 80

[[vip.backend]]
address = "198.18.2.1"

[[vip.backend]]
address = "198.18.2.2"
weight = 3
"#;

fn error_of(text: &str) -> String {
    parse(text, "lb.toml")
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn announce_section() {
    let c = parse(GOOD, "lb.toml").expect("valid");
    assert_eq!(c.announce, None, "announcement is off without the section");
    let text = GOOD.replace("[[vip]]", "[announce]\n\n[[vip]]");
    let c = parse(&text, "lb.toml").expect("valid");
    assert_eq!(c.announce, Some(Announce { table: 100 }));
    let text = GOOD.replace("[[vip]]", "[announce]\ntable = 254\n\n[[vip]]");
    let e = error_of(&text);
    assert!(
        e.starts_with("lb.toml:6:9:") && e.contains("table 254 is reserved"),
        "{e}"
    );
    let text = GOOD.replace("[[vip]]", "[announce]\nprotocol = \"bgp\"\n\n[[vip]]");
    let e = error_of(&text);
    assert!(e.contains("unknown field `protocol`"), "{e}");
}

#[test]
fn capacities_are_checked_where_they_are_exceeded() {
    let c = parse(GOOD, "lb.toml").expect("valid");
    assert_eq!(
        (c.agent.max_vips, c.agent.max_backends, c.agent.ring_slots),
        (256, 4096, 8_388_736)
    );
    // Two backends need three ids (0 is reserved).
    let e = error_of(&GOOD.replace(
        "interface = \"eth1\"",
        "interface = \"eth1\"\nmax_backends = 2",
    ));
    assert!(e.contains("agent.max_backends is 2"), "{e}");
    // One ring of 65,537 needs 131,074 slots.
    let e = error_of(&GOOD.replace(
        "interface = \"eth1\"",
        "interface = \"eth1\"\nring_slots = 131073",
    ));
    assert!(
        e.starts_with("lb.toml:") && e.contains("agent.ring_slots is 131073"),
        "{e}"
    );
    let e = error_of(&GOOD.replace("interface = \"eth1\"", "interface = \"eth1\"\nmax_vips = 0"));
    assert!(e.contains("agent.max_vips = 0 is out of range"), "{e}");
    let two = format!("{GOOD}\n[[vip]]\naddress = \"198.18.0.101\"\nport = 80\n");
    let e = error_of(&two.replace("interface = \"eth1\"", "interface = \"eth1\"\nmax_vips = 1"));
    assert!(e.contains("agent.max_vips is 1"), "{e}");
}

#[test]
fn defaults() {
    let c = parse(GOOD, "lb.toml").expect("valid");
    assert_eq!(c.agent.xdp_mode, XdpMode::Auto);
    // The value README's configuration table documents, not the
    // constant the default is made of (comparing those checks nothing).
    assert_eq!(c.agent.flow_table_size, 1_048_576);
    let readme = include_str!("../../../README.md");
    assert!(
        readme.contains("| `agent.flow_table_size` | `1048576` |"),
        "README documents the default table size"
    );
    let v = &c.vips[0];
    assert_eq!(
        (v.protocol, v.forwarding, v.hash, v.ring_size),
        (Protocol::Tcp, Forwarding::Dsr, HashInput::FiveTuple, 65537)
    );
    assert_eq!(v.health.kind, CheckKind::Tcp);
    assert_eq!(
        (
            v.health.interval_ms,
            v.health.fall,
            v.health.rise,
            v.health.port
        ),
        (200, 3, 2, 80)
    );
    assert_eq!(v.backends[1].weight, 3);
}

#[test]
fn nat_vips_and_their_sources() {
    let nat = GOOD
        .replace("port = 80", "port = 80\nforwarding = \"nat\"")
        .replace(
            "address = \"198.18.2.1\"",
            "address = \"198.18.2.1\"\nport = 8080",
        );
    // No NAT source of the VIP's family: refused where it is asked for.
    let e = error_of(&nat);
    assert!(
        e.starts_with("lb.toml:8:14:") && e.contains("set agent.nat_source_v4"),
        "{e}"
    );
    let with_src = nat.replace(
        "interface = \"eth1\"",
        "interface = \"eth1\"\nnat_source_v4 = [\"198.18.11.1\"]",
    );
    let c = parse(&with_src, "lb.toml").expect("valid");
    assert_eq!(c.vips[0].forwarding, Forwarding::Nat);
    assert_eq!(c.vips[0].backends[0].port, Some(8080));
    assert_eq!(c.vips[0].backends[1].port, None);
    assert_eq!(c.agent.nat_ports, (1024, 32767));
    assert_eq!(
        c.agent.nat_source_v4,
        vec![std::net::Ipv4Addr::new(198, 18, 11, 1)]
    );
    // A backend port only means something with NAT.
    let e = error_of(&GOOD.replace(
        "address = \"198.18.2.1\"",
        "address = \"198.18.2.1\"\nport = 8080",
    ));
    assert!(
        e.contains("a backend port needs forwarding = \"nat\""),
        "{e}"
    );
    // NAT keeps every flow in the table.
    let e = error_of(&with_src.replace("port = 80\n", "port = 80\nflow_table = false\n"));
    assert!(e.contains("remove flow_table = false"), "{e}");
    for (ports, why) in [
        ("\"100-200\"", "starts below 1024"),
        ("\"5000-4000\"", "is empty"),
        ("\"http\"", "is not a range"),
    ] {
        let e = error_of(&with_src.replace(
            "interface = \"eth1\"",
            &format!("interface = \"eth1\"\nnat_ports = {ports}"),
        ));
        assert!(e.contains(why) && e.contains("nat_ports"), "{ports}: {e}");
    }
    let e = error_of(&with_src.replace("198.18.11.1", "198.18.11.300"));
    assert!(
        e.contains("nat_source_v4 `198.18.11.300` is not an IPv4 address"),
        "{e}"
    );
}

#[test]
fn syntax_error_is_located() {
    let e = error_of("[agent]\ninterface = \"eth1\"\nport = = 3\n");
    assert!(e.starts_with("lb.toml:3:"), "{e}");
}

#[test]
fn unknown_key() {
    let e = error_of(&GOOD.replace("port = 80", "port = 80\nwieght = 2"));
    assert!(
        e.contains("unknown field `wieght`") && e.starts_with("lb.toml:8:1:"),
        "{e}"
    );
}

#[test]
fn bad_address() {
    let e = error_of(&GOOD.replace("198.18.2.1", "198.18.2.300"));
    assert!(
        e.contains("backend address `198.18.2.300` is not an IPv4 or IPv6 address"),
        "{e}"
    );
    assert!(e.starts_with("lb.toml:10:11:"), "{e}");
}

#[test]
fn ring_size_not_prime() {
    let e = error_of(&GOOD.replace("port = 80", "port = 80\nring_size = 65536"));
    assert!(e.contains("ring_size 65536 must be a prime"), "{e}");
}

#[test]
fn backend_family_mismatch() {
    let e = error_of(
        &GOOD
            .replace("port = 80", "port = 80\nforwarding = \"ipip\"")
            .replace("198.18.2.1", "2001:2::1"),
    );
    assert!(
        e.contains("backend 2001:2::1 is IPv6 but VIP 198.18.0.100 is IPv4"),
        "{e}"
    );
}

#[test]
fn duplicate_vip_and_backend() {
    let twice = format!("{GOOD}\n[[vip]]\naddress = \"198.18.0.100\"\nport = 80\n");
    assert!(error_of(&twice).contains("duplicate VIP 198.18.0.100 port 80"));
    let e = error_of(&GOOD.replace("198.18.2.2", "198.18.2.1"));
    assert!(e.contains("duplicate backend 198.18.2.1"), "{e}");
}

#[test]
fn weight_out_of_range() {
    let e = error_of(&GOOD.replace("weight = 3", "weight = 10001"));
    assert!(e.contains("weight 10001 is out of range"), "{e}");
}

#[test]
fn schedulers_and_regions() {
    let t = GOOD.replace("port = 80", "port = 80\nscheduler = \"least-connections\"")
        + "\n[[vip.region]]\nname = \"east\"\nprefixes = [\"198.19.7.0/24\"]\nbackends = [\"198.18.2.1\"]\n";
    let c = parse(&t, "x").expect("valid");
    assert_eq!(
        c.vips[0].scheduler,
        crate::policy::sched::Scheduler::LeastConnections
    );
    assert_eq!(
        c.vips[0].regions[0].prefixes,
        vec![("198.19.7.0".parse().unwrap(), 24)]
    );
    assert!(
        error_of(&GOOD.replace("port = 80", "port = 80\nscheduler = \"random\""))
            .contains("scheduler `random`")
    );
    let e = error_of(&t.replace("backends = [\"198.18.2.1\"]", "backends = [\"198.18.2.9\"]"));
    assert!(
        e.contains("198.18.2.9 is not one of this VIP's backends"),
        "{e}"
    );
    let e = error_of(&t.replace("198.19.7.0/24", "198.19.7.0/33"));
    assert!(e.contains("is not a prefix"), "{e}");
    let e = error_of(&t.replace("198.19.7.0/24", "2001:2::/48"));
    assert!(e.contains("not of the VIP's address family"), "{e}");
}

#[test]
fn bad_enums_and_http_status() {
    assert!(
        error_of(&GOOD.replace("port = 80", "port = 80\nhash = \"random\""))
            .contains("hash `random`")
    );
    assert!(
        error_of(&GOOD.replace(
            "interface = \"eth1\"",
            "interface = \"eth1\"\nxdp_mode = \"fast\""
        ))
        .contains("xdp_mode `fast`")
    );
    let http = GOOD.replace(
        "port = 80",
        "port = 80\n[vip.health]\nkind = \"http\"\nexpect_status = \"200-99\"",
    );
    assert!(error_of(&http).contains("expect_status `200-99`"));
    let ok = GOOD.replace(
        "port = 80",
        "port = 80\n[vip.health]\nkind = \"http\"\nexpect_status = \"200\"",
    );
    let c = parse(&ok, "x").expect("valid");
    assert_eq!(
        c.vips[0].health.kind,
        CheckKind::Http {
            path: "/healthz".into(),
            status: (200, 200)
        }
    );
}

#[test]
fn shipped_example_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/lb.example.toml");
    let c = load(std::path::Path::new(path)).expect("the shipped example must be valid");
    assert_eq!(c.vips.len(), 1);
    assert_eq!(c.vips[0].backends.len(), 2);
}

#[test]
fn the_http_api_needs_its_token_file_and_the_token_file_its_listener() {
    let with = |keys: &str| GOOD.replace("[agent]\n", &format!("[agent]\n{keys}\n"));
    let c = parse(
        &with("api_listen = \"127.0.0.1:9200\"\napi_token_file = \"/etc/lb/api-tokens\""),
        "lb.toml",
    )
    .expect("valid");
    assert_eq!(c.agent.api_listen, Some("127.0.0.1:9200".parse().unwrap()));
    let e = error_of(&with("api_listen = \"127.0.0.1:9200\""));
    assert!(e.contains("api_listen needs api_token_file"), "{e}");
    let e = error_of(&with("api_token_file = \"/etc/lb/api-tokens\""));
    assert!(e.contains("no effect without api_listen"), "{e}");
    let e = error_of(&with(
        "api_listen = \"localhost\"\napi_token_file = \"/etc/lb/api-tokens\"",
    ));
    assert!(e.contains("not an address:port"), "{e}");
}

#[test]
fn second_chance_defaults_to_gue_maglev_vips_and_is_refused_elsewhere() {
    let with = |extra: &str| GOOD.replace("port = 80", &format!("port = 80\n{extra}"));
    let c = parse(GOOD, "x").expect("valid");
    assert_eq!(c.vips[0].second_chance_s, 0, "dsr: none");
    let c = parse(&with("forwarding = \"gue\""), "x").expect("valid");
    assert_eq!(c.vips[0].second_chance_s, DEFAULT_SECOND_CHANCE_S);
    let c = parse(&with("forwarding = \"gue\"\nsecond_chance = 60"), "x").expect("valid");
    assert_eq!(c.vips[0].second_chance_s, 60);
    let c = parse(&with("forwarding = \"gue\"\nsecond_chance = 0"), "x").expect("valid");
    assert_eq!(c.vips[0].second_chance_s, 0, "switched off");
    let c = parse(
        &with("forwarding = \"gue\"\nscheduler = \"round-robin\""),
        "x",
    )
    .expect("valid");
    assert_eq!(c.vips[0].second_chance_s, 0, "round-robin: none by default");
    let e = error_of(&with("forwarding = \"ipip\"\nsecond_chance = 60"));
    assert!(
        e.contains("second_chance needs forwarding = \"gue\""),
        "{e}"
    );
    assert!(e.contains("`ipip` has no room"), "{e}");
    let e = error_of(&with(
        "forwarding = \"gue\"\nscheduler = \"least-connections\"\nsecond_chance = 60",
    ));
    assert!(
        e.contains("second_chance needs scheduler = \"maglev\""),
        "{e}"
    );
}

#[test]
fn a_file_built_in_code_reads_back_as_built() {
    use crate::vocab::{ProbeVia, Scheduler};
    use file::{Announce, Backend, File, Health, Region, Vip};
    let mut drained = Backend::at("2001:2::12");
    drained.drain = true;
    let f = File {
        agent: file::Agent {
            interface: "eth1".into(),
            xdp_mode: Some(XdpMode::Skb),
            flow_table_size: Some(4096),
            instance: Some("t".into()),
            control_socket: Some("/run/lb/t.sock".into()),
            metrics_listen: Some("127.0.0.1:9100".into()),
            max_vips: Some(32),
            nat_source_v4: vec!["198.18.11.1".into()],
            nat_ports: Some("2000-2999".into()),
            reply_interfaces: vec!["eth2".into()],
            ipip_mtu: Some(1400),
            ..Default::default()
        },
        announce: Some(Announce { table: 201 }),
        vips: vec![
            Vip {
                forwarding: Some(Forwarding::Nat),
                scheduler: Some(Scheduler::RoundRobin),
                idle_timeout: Some(30),
                health: Some(Health {
                    interval_ms: Some(500),
                    fall: Some(5),
                    via: Some(ProbeVia::Address),
                    ..Health::http("/healthz")
                }),
                ..Vip::new(
                    "198.18.0.100",
                    80,
                    vec![
                        Backend {
                            port: Some(8080),
                            weight: Some(3),
                            ..Backend::at("198.18.2.1")
                        },
                        Backend::at("198.18.2.2"),
                    ],
                )
            },
            Vip {
                forwarding: Some(Forwarding::Gue),
                hash: Some(HashInput::SourceIp),
                second_chance: Some(0),
                health: Some(Health::none()),
                regions: vec![Region {
                    name: "west".into(),
                    prefixes: vec!["2001:2:1::/48".into()],
                    backends: vec!["2001:2::11".into()],
                }],
                ..Vip::new("2001:2::100", 443, vec![Backend::at("2001:2::11"), drained])
            },
        ],
    };
    let text = f.to_toml("built in code");
    let c = parse(&text, "built").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(text.starts_with("# built in code\n"));
    assert_eq!(c.agent.interface, "eth1");
    assert_eq!(c.agent.xdp_mode, XdpMode::Skb);
    assert_eq!(c.agent.flow_table_size, 4096);
    assert_eq!(c.agent.instance, "t");
    assert_eq!(
        c.agent.metrics_listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
    assert_eq!(c.agent.max_vips, 32);
    assert_eq!(
        c.agent.nat_source_v4,
        vec!["198.18.11.1".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(c.agent.nat_ports, (2000, 2999));
    assert_eq!(c.agent.reply_interfaces, vec!["eth2".to_string()]);
    assert_eq!(c.agent.ipip_mtu, 1400);
    assert_eq!(c.announce, Some(super::Announce { table: 201 }));
    let (a, b) = (&c.vips[0], &c.vips[1]);
    assert_eq!((a.forwarding, a.idle_timeout_s), (Forwarding::Nat, 30));
    assert_eq!(a.scheduler, Scheduler::RoundRobin);
    assert_eq!(
        (a.health.interval_ms, a.health.fall, a.health.via),
        (500, 5, ProbeVia::Address)
    );
    assert!(matches!(&a.health.kind, CheckKind::Http { path, .. } if path == "/healthz"));
    assert_eq!(
        (
            a.backends[0].port,
            a.backends[0].weight,
            a.backends[1].weight
        ),
        (Some(8080), 3, 1)
    );
    assert_eq!(
        (b.forwarding, b.hash, b.second_chance_s),
        (Forwarding::Gue, HashInput::SourceIp, 0)
    );
    assert_eq!(b.health.kind, CheckKind::None);
    assert!(!b.backends[0].drain && b.backends[1].drain);
    assert_eq!(b.regions[0].name, "west");
    // What the builder leaves out, the file leaves out: the defaults apply.
    let bare = File {
        agent: file::Agent {
            interface: "eth1".into(),
            ..Default::default()
        },
        ..Default::default()
    }
    .to_toml("bare");
    assert_eq!(bare, "# bare\n[agent]\ninterface = \"eth1\"\n");
}
