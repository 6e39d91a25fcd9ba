//! A pool of logged-in sessions on one token, so that concurrent signatures run in
//! parallel: each call borrows a session of its own (no lock around `C_Sign`), runs on a
//! blocking thread (PKCS#11 calls block), and returns it.
//!
//! - Login state is per token and application: the first session logs in, later ones
//!   find themselves logged in. A session that reports itself logged out logs in again.
//! - A session lost behind our back (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`,
//!   `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_USER_NOT_LOGGED_IN`) is dropped;
//!   the call runs once more on a fresh, logged-in session.
//! - A refused PIN is never tried again: the pool remembers it and refuses to log in
//!   until a re-Configure brings another PIN (tokens lock after a few wrong PINs).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use keymanager_engine::settings::Secret;
use keymanager_engine::{BackendError, BackendErrorKind};
use tokio::sync::Semaphore;

use crate::errors::{is_pin_refused, is_session_lost, pkcs11_error};
use crate::module::Module;

/// Logged-in sessions on one token.
pub struct Pool {
    module: Arc<Module>,
    slot: Slot,
    token: String,
    pin: Secret,
    idle: Mutex<Vec<Session>>,
    permits: Semaphore,
    pin_refused: AtomicBool,
    /// Login attempts made (`C_Login` calls), for tests and logs.
    logins: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("slot", &self.slot.id())
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Whether the session sees the user's objects.
fn is_logged_in(session: &Session) -> bool {
    session
        .get_session_info()
        .map(|info| {
            matches!(
                info.session_state(),
                SessionState::RwUser | SessionState::RoUser
            )
        })
        .unwrap_or(false)
}

impl Pool {
    /// A pool of at most `max_sessions`, with one session opened and logged in now (a
    /// wrong PIN fails here, after exactly one attempt).
    pub async fn open(
        module: Arc<Module>,
        slot: Slot,
        token: String,
        pin: Secret,
        max_sessions: usize,
    ) -> Result<Arc<Self>, BackendError> {
        let pool = Arc::new(Self {
            module,
            slot,
            token,
            pin,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max_sessions.max(1)),
            pin_refused: AtomicBool::new(false),
            logins: AtomicU64::new(0),
        });
        let first = pool.clone();
        let session = tokio::task::spawn_blocking(move || first.fresh_session())
            .await
            .map_err(|e| BackendError::new(BackendErrorKind::Internal, e.to_string()))??;
        pool.give_back(session);
        Ok(pool)
    }

    /// `C_Login` calls so far.
    pub fn login_attempts(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Opens a read-write session and makes sure it is logged in.
    fn fresh_session(&self) -> Result<Session, BackendError> {
        let session = self
            .module
            .context
            .open_rw_session(self.slot)
            .map_err(|e| {
                pkcs11_error(e, &format!("opening a session on token {:?}", self.token))
            })?;
        self.ensure_login(&session)?;
        Ok(session)
    }

    fn ensure_login(&self, session: &Session) -> Result<(), BackendError> {
        let logged_in = session
            .get_session_info()
            .map(|info| {
                matches!(
                    info.session_state(),
                    SessionState::RwUser | SessionState::RoUser
                )
            })
            .unwrap_or(false);
        if logged_in {
            return Ok(());
        }
        if self.pin_refused.load(Ordering::Relaxed) {
            return Err(BackendError::new(
                BackendErrorKind::Unauthenticated,
                format!(
                    "token {:?} refused the PIN earlier; not trying it again (re-Configure with the right PIN)",
                    self.token
                ),
            ));
        }
        self.logins.fetch_add(1, Ordering::Relaxed);
        let pin = AuthPin::from(self.pin.expose());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) => Ok(()),
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => Ok(()),
            Err(e) => {
                if is_pin_refused(&e) {
                    self.pin_refused.store(true, Ordering::Relaxed);
                }
                Err(pkcs11_error(
                    e,
                    &format!("logging in to token {:?}", self.token),
                ))
            }
        }
    }

    fn take(&self) -> Option<Session> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn give_back(&self, session: Session) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(session);
    }

    /// Runs `op` on a session of its own, on a blocking thread; a lost session is replaced
    /// and `op` runs once more.
    pub async fn run<T, F>(self: &Arc<Self>, doing: String, op: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: Fn(&Session) -> Result<T, cryptoki::error::Error> + Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| BackendError::new(BackendErrorKind::Internal, e.to_string()))?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let session = match pool.take() {
                Some(session) => session,
                None => pool.fresh_session()?,
            };
            match op(&session) {
                Ok(value) => {
                    pool.give_back(session);
                    Ok(value)
                }
                // Logged out behind our back, private objects vanish from the session's view
                // and the token answers "invalid handle", not "not logged in": ask it.
                Err(e) if is_session_lost(&e) || !is_logged_in(&session) => {
                    tracing::warn!(token = %pool.token, error = %e, "PKCS#11 session lost; reopening and trying once more");
                    drop(session);
                    // Every idle session shares the fate of this one (token removed or
                    // re-initialised, logged out): drop them too.
                    pool.idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                    let session = pool.fresh_session()?;
                    let result = op(&session).map_err(|e| pkcs11_error(e, &doing));
                    pool.give_back(session);
                    result
                }
                Err(e) => {
                    pool.give_back(session);
                    Err(pkcs11_error(e, &doing))
                }
            }
        })
        .await
        .map_err(|e| BackendError::new(BackendErrorKind::Internal, e.to_string()))?
    }
}
