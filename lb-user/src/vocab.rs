//! One typed vocabulary for the whole agent: one enum per concept (protocol,
//! forwarding, hash input, scheduler, XDP mode, backend state), each with
//! the one spelling that the config file, the control API's JSON, the CLI's
//! flags and its output all use. `FromStr` errors list the valid values.
//! Also the concepts that carry data: a health check's kind and a VIP as
//! the CLI names it.

/// Defines a vocabulary enum with its spellings and every conversion.
macro_rules! vocab {
    ($(#[$m:meta])* $name:ident, $what:literal {
        $($(#[$vm:meta])* $var:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $var),+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [Self] = &[$(Self::$var),+];

            /// The spelling used in files, JSON and on the command line.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$var => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    let all: Vec<String> = Self::ALL.iter().map(|v| format!("\"{v}\"")).collect();
                    format!("{} `{s}` is not one of {}", $what, all.join(", "))
                })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "description": concat!("A ", $what, ", one of its spellings."),
                    "type": "string",
                    "enum": [$($text),+],
                })
            }
        }

        impl clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                Self::ALL
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.name()))
            }
        }
    };
}

vocab!(
    /// Transport protocol of a VIP.
    Protocol, "protocol" { Tcp = "tcp", Udp = "udp" }
);

vocab!(
    /// How packets reach a backend.
    Forwarding, "forwarding" {
        /// L2 direct server return: MAC rewrite; the backend owns the VIP.
        Dsr = "dsr",
        /// IPIP/IP6IP6 encapsulation; the backend runs `lb backend-host`
        /// (`lb_decap`).
        Ipip = "ipip",
        /// Full NAT: to the backend's address and port from a balancer
        /// address; replies come back through the balancer.
        Nat = "nat",
        /// IP in UDP (GUE) to `agent.gue_port`: passes networks that drop
        /// IPIP, and the UDP source port spreads flows over the backend
        /// NIC's queues; the backend runs `lb backend-host`.
        Gue = "gue",
    }
);

vocab!(
    /// What the consistent hash of a new flow covers.
    HashInput, "hash" { FiveTuple = "5-tuple", SourceIp = "source-ip" }
);

vocab!(
    /// XDP attach mode.
    XdpMode, "xdp_mode" { Native = "native", Skb = "skb", Auto = "auto" }
);

vocab!(
    /// A backend as the agent sees it.
    BackendState, "backend state" {
        /// Passing health checks and taking new flows.
        Up = "up",
        /// Failing health checks: out of the ring, its flows move.
        Down = "down",
        /// Healthy but drained (`drain` or weight 0): no new flows.
        Draining = "draining",
        /// Not probed yet (added, or the agent just started without a
        /// datapath to adopt): no new flows until its first probe succeeds.
        Unchecked = "unchecked",
    }
);

vocab!(
    /// Where a health probe goes (`vip.health.via`).
    ProbeVia, "health via" {
        /// Along the VIP's forwarding path: `dsr` to VIP:port at the
        /// backend's MAC, `ipip` encapsulated as data (`nat`: the backend's
        /// address, which is its path).
        Path = "path",
        /// To the backend's own address (the server, not the path).
        Address = "address",
    }
);

vocab!(
    /// How new flows pick a backend.
    Scheduler, "scheduler" {
        Maglev = "maglev",
        RoundRobin = "round-robin",
        WeightedRoundRobin = "weighted-round-robin",
        LeastConnections = "least-connections",
    }
);

/// What a health check does (`vip.health.kind`): nothing, a TCP connect,
/// or an HTTP GET of `path` whose status must lie in `status` (inclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    None,
    Tcp,
    Http { path: String, status: (u16, u16) },
}

/// A VIP as the CLI names it (`VipRef`): address, port, protocol; the one
/// spelling the CLI, the control API and the logs use.
/// A VIP as the CLI names it: `ADDRESS:PORT[/tcp|udp]`, e.g.
/// `198.18.0.100:80/tcp` or `[2001:2::100]:443/udp`. In JSON it is that
/// same string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipRef {
    pub address: std::net::IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl serde::Serialize for VipRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for VipRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "VipRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A VIP as `ADDRESS:PORT[/tcp|udp]` (tcp when left out), as the CLI names it.",
            "type": "string",
            "examples": ["198.18.0.100:80/tcp", "[2001:2::100]:443/udp"],
        })
    }
}

impl<'de> serde::Deserialize<'de> for VipRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for VipRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (sock, proto) = match s.rsplit_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<Protocol>()
                    .map_err(|e| format!("{e} (in `{s}`)"))?,
            ),
            None => (s, Protocol::Tcp),
        };
        let sa: std::net::SocketAddr = sock
            .parse()
            .map_err(|_| format!("`{s}` is not ADDRESS:PORT[/tcp|udp] (IPv6 as [2001:2::1]:80)"))?;
        Ok(Self {
            address: sa.ip(),
            port: sa.port(),
            protocol: proto,
        })
    }
}

impl std::fmt::Display for VipRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            std::net::IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            std::net::IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of `T` reads back from its spelling through `FromStr`,
    /// serde (JSON and TOML) and clap, and is spelled the same by each.
    fn round_trip<T>()
    where
        T: Copy
            + PartialEq
            + std::fmt::Debug
            + std::fmt::Display
            + std::str::FromStr
            + serde::Serialize
            + serde::de::DeserializeOwned
            + clap::ValueEnum
            + 'static,
        <T as std::str::FromStr>::Err: std::fmt::Debug,
    {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Doc<T> {
            v: T,
        }
        for v in T::value_variants() {
            let text = v.to_string();
            assert_eq!(text.parse::<T>().unwrap(), *v, "FromStr of {text}");
            let j = serde_json::to_string(v).unwrap();
            assert_eq!(j, format!("\"{text}\""), "JSON spelling");
            assert_eq!(serde_json::from_str::<T>(&j).unwrap(), *v);
            let t = toml::to_string(&Doc { v: *v }).unwrap();
            assert_eq!(t.trim(), format!("v = \"{text}\""), "TOML spelling");
            assert_eq!(toml::from_str::<Doc<T>>(&t).unwrap().v, *v);
            let pv = v.to_possible_value().expect("a clap value");
            assert_eq!(pv.get_name(), text, "clap spelling");
            assert_eq!(
                <T as clap::ValueEnum>::from_str(&text, false).unwrap(),
                *v,
                "clap parse"
            );
        }
    }

    #[test]
    fn spellings_round_trip_everywhere() {
        round_trip::<Protocol>();
        round_trip::<Forwarding>();
        round_trip::<HashInput>();
        round_trip::<XdpMode>();
        round_trip::<BackendState>();
        round_trip::<Scheduler>();
        round_trip::<ProbeVia>();
        assert_eq!(
            serde_json::to_string(&HashInput::FiveTuple).unwrap(),
            "\"5-tuple\""
        );
        assert_eq!(
            "shutdown".parse::<Forwarding>().unwrap_err(),
            "forwarding `shutdown` is not one of \"dsr\", \"ipip\", \"nat\", \"gue\""
        );
        assert!(serde_json::from_str::<BackendState>("\"sleeping\"").is_err());
    }
}
