//! The HTTP API's bearer tokens (`agent.api_token_file`). One token per
//! line, `ACCESS TOKEN [NAME]`: ACCESS is `read-only` or `read-write`, TOKEN
//! at least 32 visible characters (e.g. `openssl rand -hex 32`), NAME what
//! the agent's log calls its changes. `#` starts a comment. The file must
//! belong to the agent's user and be closed to group and others (mode 0600
//! or 0400), as ssh asks of its keys. The agent reads it again whenever it
//! changes, so a token is added or revoked without a restart; a file that
//! no longer checks out refuses every request until it is fixed.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Result, bail};
use subtle::ConstantTimeEq as _;

use super::Access;

/// The shortest token accepted.
pub const MIN_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub access: Access,
    secret: String,
    /// From the file's third column, else `token N` (its line number).
    pub name: String,
}

/// The tokens of one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens(Vec<Token>);

impl Tokens {
    /// Reads and checks `path`: owner, mode, every line.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| {
            anyhow::anyhow!(
                "api_token_file {}: {e}; create it with lines `read-write TOKEN` (mode 0600)",
                path.display()
            )
        })?;
        check_mode(path, meta.mode(), meta.uid())?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading api_token_file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("api_token_file {}: {e}", path.display()))
    }

    /// The tokens of a file's text.
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let n = i + 1;
            let mut words = line.split_whitespace();
            let (Some(access), Some(secret)) = (words.next(), words.next()) else {
                bail!("line {n}: expected `read-only TOKEN` or `read-write TOKEN` [NAME]");
            };
            let access = match access {
                "read-only" => Access::Read,
                "read-write" => Access::Write,
                other => {
                    bail!("line {n}: access `{other}` is not `read-only` or `read-write`")
                }
            };
            if secret.len() < MIN_LEN {
                bail!(
                    "line {n}: the token is {} characters, fewer than {MIN_LEN}; make one with \
                     `openssl rand -hex 32`",
                    secret.len()
                );
            }
            let name = match (words.next(), words.next()) {
                (None, _) => format!("token {n}"),
                (Some(w), None) => w.to_string(),
                (Some(_), Some(_)) => bail!("line {n}: a NAME is one word"),
            };
            if out.iter().any(|t: &Token| t.secret == secret) {
                bail!("line {n}: the same token as an earlier line");
            }
            out.push(Token {
                access,
                secret: secret.to_string(),
                name,
            });
        }
        if out.is_empty() {
            bail!("no token in the file: add a line `read-write TOKEN` (`openssl rand -hex 32`)");
        }
        Ok(Tokens(out))
    }

    /// The token an `Authorization` header's value presents, if the file
    /// holds it (compared in constant time, every token tried).
    pub fn find(&self, authorization: Option<&str>) -> Option<&Token> {
        // The scheme is case-insensitive (RFC 7235).
        let a = authorization?.trim_start();
        let (scheme, rest) = a.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let presented = rest.trim().as_bytes();
        let mut found = None;
        for t in &self.0 {
            if bool::from(t.secret.as_bytes().ct_eq(presented)) {
                found = Some(t);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn read_only(&self) -> usize {
        self.0.iter().filter(|t| t.access == Access::Read).count()
    }
}

fn check_mode(path: &Path, mode: u32, uid: u32) -> Result<()> {
    // SAFETY: geteuid(2) has no memory effects and cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me {
        bail!(
            "api_token_file {} belongs to uid {uid}, not to the agent's user (uid {me}): \
             `chown {me} {}`",
            path.display(),
            path.display()
        );
    }
    if mode & 0o077 != 0 {
        bail!(
            "api_token_file {} is open to group or others (mode {:04o}): `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    Ok(())
}

/// The file as the agent serves it: read again whenever its identity,
/// size, mode or modification time changes.
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(Stamp, Result<Tokens, String>)>>,
}

/// What makes the file read again: its identity, times, size, mode and
/// owner (a `chmod` or `chown` changes the ctime too).
type Stamp = (u64, u64, i64, i64, i64, i64, u64, u32, u32);

impl TokenFile {
    /// Loads `path` once, refusing to start with a file that does not
    /// check out.
    pub fn open(path: &Path) -> Result<Self> {
        let f = TokenFile {
            path: path.to_path_buf(),
            cached: Mutex::new(None),
        };
        f.current().map_err(anyhow::Error::msg)?;
        Ok(f)
    }

    /// The tokens now, or why the file does not check out.
    pub fn current(&self) -> Result<Tokens, String> {
        let stamp = std::fs::metadata(&self.path)
            .map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                    m.size(),
                    m.mode(),
                    m.uid(),
                )
            })
            .map_err(|e| format!("api_token_file {}: {e}", self.path.display()))?;
        let mut c = self
            .cached
            .lock()
            .map_err(|_| "the token cache lock is poisoned".to_string())?;
        if let Some((s, t)) = c.as_ref()
            && *s == stamp
        {
            return t.clone();
        }
        let t = Tokens::load(&self.path).map_err(|e| format!("{e:#}"));
        if let Err(e) = &t {
            tracing::error!(error = %e, "the HTTP API refuses every request until the token file is fixed");
        } else if c.is_some() {
            tracing::info!(file = %self.path.display(), "API tokens read again");
        }
        *c = Some((stamp, t.clone()));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn lines_access_names_and_lookup() {
        let t = Tokens::parse(&format!(
            "# tokens\nread-write {A} deployer\n\nread-only {B}  # the dashboard\n"
        ))
        .unwrap();
        assert_eq!((t.len(), t.read_only()), (2, 1));
        let a = t.find(Some(&format!("Bearer {A}"))).unwrap();
        assert_eq!((a.access, a.name.as_str()), (Access::Write, "deployer"));
        let b = t.find(Some(&format!("Bearer {B}"))).unwrap();
        assert_eq!((b.access, b.name.as_str()), (Access::Read, "token 4"));
        assert!(t.find(Some(&format!("Bearer {A}x"))).is_none());
        assert!(t.find(Some(&format!("Basic {A}"))).is_none());
        assert!(
            t.find(Some(&format!("bearer {A}"))).is_some(),
            "case-insensitive scheme"
        );
        assert!(t.find(None).is_none());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e = |s: &str| format!("{:#}", Tokens::parse(s).unwrap_err());
        assert!(e("").contains("no token"));
        assert!(e(&format!("admin {A}")).contains("access `admin`"));
        assert!(e("read-write short").contains("fewer than 32"));
        assert!(e(&format!("read-write {A}\nread-only {A}")).contains("line 2: the same token"));
        assert!(e(&format!("read-write {A} two words")).contains("one word"));
        assert!(e("read-write").contains("line 1"));
    }

    #[test]
    fn modes_and_owners() {
        let me = unsafe { libc::geteuid() };
        let p = Path::new("/etc/lb/tokens");
        assert!(check_mode(p, 0o100600, me).is_ok());
        assert!(check_mode(p, 0o100400, me).is_ok());
        let e = check_mode(p, 0o100644, me).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        let e = check_mode(p, 0o100600, me + 1).unwrap_err().to_string();
        assert!(e.contains("chown"), "{e}");
    }
}
