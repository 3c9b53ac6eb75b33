//! The local terminal of `exec -t`: raw mode for as long as the session
//! lasts (restored on drop, also on error) and the window size to send to
//! the capsule's PTY. Deciding when a terminal is used is the exec
//! session's; this module only touches the file descriptor it is given.

use std::os::fd::AsFd;

use rustix::termios::{OptionalActions, Termios, tcgetattr, tcgetwinsize, tcsetattr};

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: impl AsFd) -> bool {
    rustix::termios::isatty(fd)
}

/// Raw mode on a terminal until dropped: keys reach the capsule as typed
/// (Ctrl-C included, for the remote shell to handle), nothing is echoed
/// locally.
#[derive(Debug)]
pub struct RawMode<F: AsFd> {
    fd: F,
    saved: Termios,
}

impl<F: AsFd> RawMode<F> {
    /// Switches `fd` to raw mode; `Err` when it is not a terminal.
    pub fn enter(fd: F) -> rustix::io::Result<Self> {
        let saved = tcgetattr(&fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&fd, OptionalActions::Now, &raw)?;
        Ok(Self { fd, saved })
    }
}

impl<F: AsFd> Drop for RawMode<F> {
    fn drop(&mut self) {
        // Nothing else to do if it fails: the terminal is going away.
        let _ = tcsetattr(&self.fd, OptionalActions::Now, &self.saved);
    }
}

/// The terminal's size as (columns, rows), `None` when unknown.
pub fn window_size(fd: impl AsFd) -> Option<(u16, u16)> {
    let ws = tcgetwinsize(fd).ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use rustix::termios::{LocalModes, Winsize, tcsetwinsize};

    /// A pseudo-terminal pair: (controller, the terminal end).
    fn pty() -> (std::os::fd::OwnedFd, std::fs::File) {
        let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&controller).unwrap();
        unlockpt(&controller).unwrap();
        let name = ptsname(&controller, Vec::new()).unwrap();
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap();
        (controller, tty)
    }

    #[test]
    fn raw_mode_stops_echo_and_line_editing_and_is_undone_on_drop() {
        let (_controller, tty) = pty();
        assert!(is_terminal(&tty));
        let before = tcgetattr(&tty).unwrap();
        assert!(
            before
                .local_modes
                .contains(LocalModes::ECHO | LocalModes::ICANON)
        );
        {
            let _raw = RawMode::enter(&tty).unwrap();
            let during = tcgetattr(&tty).unwrap();
            assert!(
                !during
                    .local_modes
                    .intersects(LocalModes::ECHO | LocalModes::ICANON | LocalModes::ISIG)
            );
        }
        let after = tcgetattr(&tty).unwrap();
        assert_eq!(after.local_modes, before.local_modes);
    }

    #[test]
    fn a_file_is_no_terminal_and_cannot_go_raw() {
        let f = tempfile::tempfile().unwrap();
        assert!(!is_terminal(&f));
        assert!(RawMode::enter(&f).is_err());
        assert_eq!(window_size(&f), None);
    }

    #[test]
    fn the_window_size_is_read_from_the_terminal() {
        let (controller, tty) = pty();
        tcsetwinsize(
            &controller,
            Winsize {
                ws_row: 43,
                ws_col: 132,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .unwrap();
        assert_eq!(window_size(&tty), Some((132, 43)));
    }
}
