//! Outbound network policy for handlers' `fetch()`.
//!
//! Until the node's guarded client (DNS via hickory, address classifier,
//! subrequest limits) is in place, outbound fetch is refused: failing
//! closed is the only safe default for a multi-tenant node.

use std::sync::Arc;

use deno_permissions::{Permissions, PermissionsContainer, RuntimePermissionDescriptorParser};

/// Permissions that deny every network, file and environment access.
pub(crate) fn no_network_permissions() -> PermissionsContainer {
    PermissionsContainer::new(
        Arc::new(RuntimePermissionDescriptorParser::new(
            sys_traits::impls::RealSys,
        )),
        Permissions::none_without_prompt(),
    )
}
