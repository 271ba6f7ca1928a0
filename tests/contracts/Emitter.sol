// SPDX-License-Identifier: Apache-2.0
// Test and demo contract for logcursor: emits many events per transaction so
// that a chain of a few hundred blocks carries thousands of logs, and one event
// that exercises every ABI type the `events.params` JSON encoding must handle.
// Compiled by scripts/compile-contract; the ABI and bytecode are committed in
// Emitter.json so tests need no compiler.
pragma solidity 0.8.30;

contract Emitter {
    event Burned(address indexed from, uint256 amount);
    event Rich(
        address indexed to,
        int256 indexed delta,
        uint256 id,
        int64 small,
        bytes32 tag,
        bool flag,
        string note,
        bytes blob,
        uint256[] list,
        Pair pair
    );
    event Unlisted(uint256 value);
    /// Indexed dynamic values (stored as their topic, a hash) beside plain ones.
    event Labeled(string indexed label, bytes indexed blob, string text, uint8 small, int256 delta);

    struct Pair {
        uint256 a;
        address b;
    }

    /// Emits `count` Burned events with amounts base, base+1, ….
    function burn(uint256 count, uint256 base) external {
        for (uint256 i = 0; i < count; i++) {
            emit Burned(msg.sender, base + i);
        }
    }

    /// Emits one Rich event with the given values.
    function rich(
        address to,
        int256 delta,
        uint256 id,
        int64 small,
        bytes32 tag,
        bool flag,
        string calldata note,
        bytes calldata blob,
        uint256[] calldata list,
        Pair calldata pair
    ) external {
        emit Rich(to, delta, id, small, tag, flag, note, blob, list, pair);
    }

    /// Emits one Labeled event.
    function label(
        string calldata label_,
        bytes calldata blob,
        string calldata text,
        uint8 small,
        int256 delta
    ) external {
        emit Labeled(label_, blob, text, small, delta);
    }

    /// Emits an event that no test configures, to prove topic filtering.
    function unlisted(uint256 value) external {
        emit Unlisted(value);
    }
}
