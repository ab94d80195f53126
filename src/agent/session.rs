//! Sessions as the agent knows them. For now: identity and resumption; the
//! activity accounting and cleanup of a session come with the sessions issue.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub id: String,
    pub resume_token: String,
}

#[derive(Default)]
pub struct Sessions {
    by_token: Mutex<HashMap<String, SessionRecord>>,
}

impl Sessions {
    /// Resumes the session a token names, or starts a new one. Returns the
    /// record and whether it was resumed.
    pub fn open(&self, resume_token: Option<&str>) -> std::io::Result<(SessionRecord, bool)> {
        let mut sessions =
            self.by_token.lock().map_err(|_| std::io::Error::other("session table poisoned"))?;
        if let Some(record) = resume_token.and_then(|token| sessions.get(token)) {
            return Ok((record.clone(), true));
        }
        let record = SessionRecord { id: random_hex(8)?, resume_token: random_hex(24)? };
        sessions.insert(record.resume_token.clone(), record.clone());
        Ok((record, false))
    }
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buffer = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buffer)?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_by_token_and_starts_fresh_otherwise() {
        let sessions = Sessions::default();
        let (first, resumed) = sessions.open(None).unwrap();
        assert!(!resumed);
        let (again, resumed) = sessions.open(Some(&first.resume_token)).unwrap();
        assert!(resumed);
        assert_eq!(again.id, first.id);
        let (other, resumed) = sessions.open(Some("unknown")).unwrap();
        assert!(!resumed);
        assert_ne!(other.id, first.id);
        assert_eq!(first.resume_token.len(), 48);
    }
}
