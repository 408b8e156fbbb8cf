//! Running the iptables tools: flavour detection (nft or legacy, as kube-proxy's iptables wrapper decides),
//! `iptables-restore --noflush`, `iptables-save`, `-C`/`-I`/`-D` for the jump rules, all with the xtables lock
//! (`-w`). Optionally every command runs inside a named network namespace ([`crate::netns::command`]); sysctls and
//! addresses are read in-process ([`crate::netns`]).

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// Seconds to wait for the xtables lock.
const LOCK_WAIT: &str = "5";

/// Which iptables backend the node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Nft,
    Legacy,
}

impl Flavour {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavour::Nft => "nft",
            Flavour::Legacy => "legacy",
        }
    }
}

/// Runs the iptables tools of one flavour, in one network namespace.
#[derive(Debug, Clone)]
pub struct Exec {
    netns: Option<String>,
    flavour: Flavour,
    /// Whether the `iptables-<flavour>` binaries exist (else plain `iptables` is used).
    suffixed: bool,
    /// IPv6: `ip6tables*` instead of `iptables*`.
    ipv6: bool,
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Counts the rules (`-A` lines) in `*-save` output.
fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

impl Exec {
    /// Detects the flavour the node already uses, like kube-proxy's iptables wrapper: a kubelet/kube-proxy hint
    /// chain (`KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY` in mangle) decides first; otherwise the backend with
    /// more rules (IPv4 + IPv6) wins, nft on a tie (and so on an empty node).
    pub fn detect(netns: Option<&str>) -> Self {
        let probe = |flavour: Flavour| Exec {
            netns: netns.map(str::to_string),
            flavour,
            suffixed: true,
            ipv6: false,
        };
        let (nft, legacy) = (probe(Flavour::Nft), probe(Flavour::Legacy));
        let have_nft = on_path("iptables-nft-save");
        let have_legacy = on_path("iptables-legacy-save");
        let flavour = match (have_nft, have_legacy) {
            (false, false) => {
                let e = Exec {
                    netns: netns.map(str::to_string),
                    flavour: Flavour::Nft,
                    suffixed: false,
                    ipv6: false,
                };
                let f = e.plain_version_flavour();
                tracing::info!(
                    flavour = f.as_str(),
                    "iptables-nft/legacy binaries not found, using plain iptables"
                );
                return Exec { flavour: f, ..e };
            }
            (true, false) => Flavour::Nft,
            (false, true) => Flavour::Legacy,
            (true, true) => {
                let hint = |e: &Exec| {
                    e.save_quiet("iptables", "mangle")
                        .is_some_and(|s| s.contains(":KUBE-IPTABLES-HINT") || s.contains(":KUBE-KUBELET-CANARY"))
                };
                let count = |e: &Exec| -> usize {
                    ["iptables", "ip6tables"]
                        .iter()
                        .filter_map(|t| e.save_all_quiet(t))
                        .map(|s| count_rules(&s))
                        .sum()
                };
                let (hl, hn) = (hint(&legacy), hint(&nft));
                let (l, n) = if hl || hn {
                    (0, 0)
                } else {
                    (count(&legacy), count(&nft))
                };
                tracing::debug!(
                    legacy_hint = hl,
                    nft_hint = hn,
                    legacy_rules = l,
                    nft_rules = n,
                    "iptables flavour"
                );
                decide(hl, hn, l, n)
            }
        };
        let suffixed = match flavour {
            Flavour::Nft => have_nft && on_path("iptables-nft-restore") && on_path("iptables-nft"),
            Flavour::Legacy => have_legacy && on_path("iptables-legacy-restore") && on_path("iptables-legacy"),
        };
        Exec {
            netns: netns.map(str::to_string),
            flavour,
            suffixed,
            ipv6: false,
        }
    }

    /// Uses `flavour` without detection.
    pub fn with_flavour(netns: Option<&str>, flavour: Flavour) -> Self {
        let suffixed = match flavour {
            Flavour::Nft => on_path("iptables-nft-restore") && on_path("iptables-nft") && on_path("iptables-nft-save"),
            Flavour::Legacy => {
                on_path("iptables-legacy-restore") && on_path("iptables-legacy") && on_path("iptables-legacy-save")
            }
        };
        Exec {
            netns: netns.map(str::to_string),
            flavour,
            suffixed,
            ipv6: false,
        }
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The same flavour and namespace, running the tools of `family` (`ip6tables*` for IPv6).
    pub fn for_family(&self, family: crate::model::IpFamily) -> Self {
        Exec {
            ipv6: family == crate::model::IpFamily::V6,
            ..self.clone()
        }
    }

    pub fn family(&self) -> crate::model::IpFamily {
        if self.ipv6 {
            crate::model::IpFamily::V6
        } else {
            crate::model::IpFamily::V4
        }
    }

    /// `iptables` or `ip6tables`, for messages.
    pub fn tool(&self) -> &'static str {
        if self.ipv6 {
            "ip6tables"
        } else {
            "iptables"
        }
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    fn plain_version_flavour(&self) -> Flavour {
        match self.version_string() {
            Some(v) if v.contains("legacy") => Flavour::Legacy,
            _ => Flavour::Nft,
        }
    }

    /// `iptables` -> `iptables-nft`, `iptables-restore` -> `iptables-nft-restore`, ...
    fn bin(&self, tool: &str) -> String {
        let tool = match tool.strip_prefix("iptables") {
            Some(rest) if self.ipv6 => format!("ip6tables{rest}"),
            _ => tool.to_string(),
        };
        let tool = tool.as_str();
        if !self.suffixed {
            return tool.to_string();
        }
        let f = self.flavour.as_str();
        match tool.split_once('-') {
            Some((base, rest)) => format!("{base}-{f}-{rest}"),
            None => format!("{tool}-{f}"),
        }
    }

    /// A command for `tool`, inside the namespace when there is one ([`crate::netns::command`]).
    pub fn command(&self, program: &str) -> Result<Command> {
        Ok(crate::netns::command(self.netns.as_deref(), program)?)
    }

    fn run(&self, mut cmd: Command) -> Result<Output> {
        let desc = format!("{cmd:?}");
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {desc}"))?;
        if !out.status.success() {
            bail!(
                "{desc} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    fn save_quiet(&self, tool: &str, table: &str) -> Option<String> {
        let mut c = self.command(&self.bin(&format!("{tool}-save"))).ok()?;
        c.args(["-t", table]).stderr(Stdio::null());
        self.run(c)
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn save_all_quiet(&self, tool: &str) -> Option<String> {
        let mut c = self.command(&self.bin(&format!("{tool}-save"))).ok()?;
        c.stderr(Stdio::null());
        self.run(c)
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `iptables --version`, e.g. `iptables v1.8.9 (nf_tables)`.
    pub fn version_string(&self) -> Option<String> {
        let mut c = self.command(&self.bin("iptables")).ok()?;
        c.arg("--version");
        self.run(c)
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// Whether `MASQUERADE --random-fully` is supported: iptables 1.6.2 or later, as kube-proxy checks.
    pub fn has_random_fully(&self) -> bool {
        let Some(v) = self.version_string() else {
            return false;
        };
        parse_version(&v).is_some_and(|v| v >= (1, 6, 2))
    }

    /// `iptables-save -t TABLE`.
    pub fn save(&self, table: &str) -> Result<String> {
        let mut c = self.command(&self.bin("iptables-save"))?;
        c.args(["-t", table]);
        let out = self.run(c)?;
        String::from_utf8(out.stdout).map_err(|e| anyhow!("{}-save output is not UTF-8: {e}", self.tool()))
    }

    /// Feeds `input` to `iptables-restore -w 5 --noflush --counters`: one atomic transaction. On failure the
    /// error quotes the lines iptables-restore complained about.
    pub fn restore(&self, input: &str) -> Result<()> {
        let mut c = self.command(&self.bin("iptables-restore"))?;
        c.args(["-w", LOCK_WAIT, "--noflush", "--counters"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().with_context(|| format!("starting {}-restore", self.tool()))?;
        let mut stdin = child.stdin.take().context("iptables-restore stdin")?;
        // Write from a thread so a restore that fails early (and stops reading) cannot deadlock us.
        let data = input.as_bytes().to_vec();
        let writer = std::thread::spawn(move || {
            let r = stdin.write_all(&data);
            drop(stdin);
            r
        });
        let out = child.wait_with_output().context("waiting for iptables-restore")?;
        let write_res = writer.join().map_err(|_| anyhow!("iptables-restore writer panicked"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            bail!(
                "{}-restore failed ({}): {err}{}",
                self.tool(),
                out.status,
                context_lines(input, &err)
            );
        }
        write_res.context("writing to iptables-restore")?;
        Ok(())
    }

    /// `iptables -w 5 -t TABLE -C CHAIN ARGS`: whether the rule exists.
    pub fn check_rule(&self, table: &str, chain: &str, args: &[&str]) -> Result<bool> {
        let mut c = self.command(&self.bin("iptables"))?;
        c.args(["-w", LOCK_WAIT, "-t", table, "-C", chain]).args(args);
        let out = c.stdin(Stdio::null()).output().context("running iptables -C")?;
        match out.status.code() {
            Some(0) => Ok(true),
            // 1: no such rule; 2: no such chain / target (also means the rule is not there).
            Some(1) | Some(2) => Ok(false),
            _ => bail!(
                "iptables -C failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    /// `iptables -w 5 -t TABLE -S CHAIN`: the chain's rules in `iptables-save` form.
    pub fn list_chain(&self, table: &str, chain: &str) -> Result<Vec<String>> {
        let mut c = self.command(&self.bin("iptables"))?;
        c.args(["-w", LOCK_WAIT, "-t", table, "-S", chain]);
        let out = self.run(c)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// `iptables -w 5 -t TABLE -I CHAIN ARGS` (prepend).
    pub fn insert_rule(&self, table: &str, chain: &str, args: &[&str]) -> Result<()> {
        let mut c = self.command(&self.bin("iptables"))?;
        c.args(["-w", LOCK_WAIT, "-t", table, "-I", chain]).args(args);
        self.run(c).map(|_| ())
    }

    /// `iptables -w 5 -t TABLE -D CHAIN ARGS`.
    pub fn delete_rule(&self, table: &str, chain: &str, args: &[&str]) -> Result<()> {
        let mut c = self.command(&self.bin("iptables"))?;
        c.args(["-w", LOCK_WAIT, "-t", table, "-D", chain]).args(args);
        self.run(c).map(|_| ())
    }

    /// Reads a sysctl (`net.ipv4.conf.all.route_localnet`) inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Option<String> {
        crate::netns::run_in(self.netns(), || crate::netns::sysctl_get(key))
            .ok()?
            .ok()
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl_set(&self, key: &str, value: &str) -> Result<()> {
        Ok(crate::netns::run_in(self.netns(), || {
            crate::netns::sysctl_set(key, value)
        })??)
    }

    /// The IPv4 addresses of the namespace's interfaces.
    pub fn local_addrs(&self) -> Result<Vec<IpAddr>> {
        let all = crate::netns::run_in(self.netns(), crate::netns::local_addrs)??;
        let family = self.family();
        Ok(all.into_iter().filter(|a| family.matches(a)).collect())
    }
}

/// kube-proxy's (iptables-wrapper's) choice: a hint chain decides (nft when both have one); otherwise the backend
/// with more rules, nft on a tie.
pub fn decide(legacy_hint: bool, nft_hint: bool, legacy_rules: usize, nft_rules: usize) -> Flavour {
    if nft_hint {
        Flavour::Nft
    } else if legacy_hint || legacy_rules > nft_rules {
        Flavour::Legacy
    } else {
        Flavour::Nft
    }
}

/// `(major, minor, patch)` from `iptables v1.8.9 (nf_tables)`.
pub fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let v = s.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// The chain names (`:NAME POLICY [p:b]` lines) of an `iptables-save` table that start with `prefix`.
pub fn chains_with_prefix(save: &str, prefix: &str) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// For an iptables-restore error naming a line ("line 12 failed"), that line and its neighbours.
fn context_lines(input: &str, err: &str) -> String {
    // "line 12 failed" (commit errors) or "Error occurred at line: 12" (parse errors).
    let Some(n) = err.split("line").skip(1).find_map(|s| {
        s.trim_start_matches([':', ' '])
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<usize>()
            .ok()
    }) else {
        return String::new();
    };
    let lines: Vec<&str> = input.lines().collect();
    let lo = n.saturating_sub(3);
    let hi = (n + 2).min(lines.len());
    let mut out = String::from("\ninput around the failing line:");
    for (i, l) in lines.iter().enumerate().take(hi).skip(lo) {
        out.push_str(&format!("\n{:>6}{} {l}", i + 1, if i + 1 == n { ">" } else { ":" }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_decision() {
        assert_eq!(decide(false, false, 0, 0), Flavour::Nft);
        assert_eq!(decide(false, false, 10, 10), Flavour::Nft);
        assert_eq!(decide(false, false, 11, 10), Flavour::Legacy);
        assert_eq!(decide(false, false, 3, 40), Flavour::Nft);
        assert_eq!(decide(true, false, 0, 99), Flavour::Legacy);
        assert_eq!(decide(false, true, 99, 0), Flavour::Nft);
        assert_eq!(decide(true, true, 99, 0), Flavour::Nft);
        assert_eq!(count_rules("*nat\n:X - [0:0]\n-A X -j Y\n-A X -j Z\nCOMMIT\n"), 2);
    }

    #[test]
    fn versions_and_parsing() {
        assert_eq!(parse_version("iptables v1.8.9 (nf_tables)"), Some((1, 8, 9)));
        assert_eq!(parse_version("iptables v1.6 (legacy)"), Some((1, 6, 0)));
        assert_eq!(parse_version("garbage"), None);
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:ORCA-SERVICES - [0:0]\n:KUBE-SERVICES - [0:0]\n-A X\nCOMMIT\n";
        assert_eq!(chains_with_prefix(save, "ORCA-"), vec!["ORCA-SERVICES".to_string()]);
        let ctx = context_lines("a\nb\nc\nd\ne\n", "iptables-restore: line 3 failed");
        assert!(ctx.contains("3> c"), "{ctx}");
        let ctx = context_lines("a\nb\nc\nd\ne\n", "Couldn't load match\nError occurred at line: 5\nTry");
        assert!(ctx.contains("5> e") && ctx.contains("4: d"), "{ctx}");
        assert_eq!(context_lines("a\n", "no number here"), "");
    }
}
