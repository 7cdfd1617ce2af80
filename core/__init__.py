"""The ground floor: configs, checkpoints, the device and the command-line convention, pictures. Every other
package may import it; it imports nothing of ours."""
