! Per-call latency of a model through Caldera's Fortran module (any input and output ranks: the 8-64-64-4 closure
! MLP, a field model, an atoms -> energies potential): one JSON line, microseconds per call. Set OMP_NUM_THREADS for
! the thread count.
!   caldera_bench_f90 PACKAGE.pt2|EXPORT_DIR BATCH ITERATIONS
program bench
  use, intrinsic :: iso_fortran_env, only: real32, int64
  use caldera
  implicit none
  type(caldera_model) :: model
  character(len=4096) :: path, arg
  integer :: batch, iterations, i, status
  integer(int64), allocatable :: xs(:), ys(:)
  real(real32), allocatable :: x1(:), x2(:,:), x3(:,:,:), x4(:,:,:,:), x5(:,:,:,:,:)
  real(8), allocatable :: us(:)
  integer(int64) :: t0, t1, rate

  call get_command_argument(1, path)
  call get_command_argument(2, arg)
  read(arg, *) batch
  call get_command_argument(3, arg)
  read(arg, *) iterations
  if (caldera_load(model, trim(path)) /= CALDERA_OK) then
    write(0, '(a)') 'caldera_bench_f90: ' // caldera_last_error()
    error stop 1
  end if
  status = caldera_input_shape(model, 1, xs)
  status = caldera_output_shape(model, 1, ys)
  where (xs < 0) xs = batch
  where (ys < 0) ys = batch
  allocate(us(iterations))
  call system_clock(count_rate=rate)
  ! The arrays have the model's own ranks; with_input/time_calls take them as assumed-rank, as caldera_run does.
  select case (size(xs))
  case (1)
    allocate(x1(xs(1))); x1 = 0.5; call with_input(x1)
  case (2)
    allocate(x2(xs(1), xs(2))); x2 = 0.5; call with_input(x2)
  case (3)
    allocate(x3(xs(1), xs(2), xs(3))); x3 = 0.5; call with_input(x3)
  case (4)
    allocate(x4(xs(1), xs(2), xs(3), xs(4))); x4 = 0.5; call with_input(x4)
  case (5)
    allocate(x5(xs(1), xs(2), xs(3), xs(4), xs(5))); x5 = 0.5; call with_input(x5)
  case default
    write(0, '(a)') 'caldera_bench_f90: inputs of rank 1 to 5 only'
    error stop 2
  end select
  if (status /= CALDERA_OK) then
    write(0, '(a)') 'caldera_bench_f90: ' // caldera_last_error()
    error stop 1
  end if
  call sort(us)
  write(*, '(a, a, a, i0, a, i0, a, f0.3, a, f0.3, a, f0.3, a)') '{"caller": "fortran", "model": "', trim(path), &
    '", "batch": ', batch, ', "iterations": ', iterations, ', "caldera_us": {"p50": ', us(iterations / 2 + 1), &
    ', "p99": ', us(max(1, (iterations * 99) / 100)), ', "mean": ', sum(us) / iterations, '}}'
  call caldera_free(model)

contains

  ! The output array, of the model's output rank, for the input ``x``; then the timed calls.
  subroutine with_input(x)
    real(real32), intent(in), target, contiguous :: x(..)
    real(real32), allocatable :: y1(:), y2(:,:), y3(:,:,:), y4(:,:,:,:), y5(:,:,:,:,:)
    select case (size(ys))
    case (1)
      allocate(y1(ys(1))); call time_calls(x, y1)
    case (2)
      allocate(y2(ys(1), ys(2))); call time_calls(x, y2)
    case (3)
      allocate(y3(ys(1), ys(2), ys(3))); call time_calls(x, y3)
    case (4)
      allocate(y4(ys(1), ys(2), ys(3), ys(4))); call time_calls(x, y4)
    case (5)
      allocate(y5(ys(1), ys(2), ys(3), ys(4), ys(5))); call time_calls(x, y5)
    case default
      write(0, '(a)') 'caldera_bench_f90: outputs of rank 1 to 5 only'
      error stop 2
    end select
  end subroutine with_input

  subroutine time_calls(x, y)
    real(real32), intent(in), target, contiguous :: x(..)
    real(real32), intent(inout), target, contiguous :: y(..)
    do i = 1, min(iterations, 200)  ! warm caches, the allocator and lazy initialisation
      status = caldera_run(model, x, y)
    end do
    do i = 1, iterations
      call system_clock(t0)
      status = caldera_run(model, x, y)
      call system_clock(t1)
      us(i) = real(t1 - t0, 8) * 1d6 / real(rate, 8)
    end do
  end subroutine time_calls

  ! A heap sort: n log n for 1e5 samples without a library.
  subroutine sort(a)
    real(8), intent(inout) :: a(:)
    integer :: n, i
    real(8) :: t
    n = size(a)
    do i = n / 2, 1, -1
      call sift(a, i, n)
    end do
    do i = n, 2, -1
      t = a(1); a(1) = a(i); a(i) = t
      call sift(a, 1, i - 1)
    end do
  end subroutine sort

  subroutine sift(a, start, last)
    real(8), intent(inout) :: a(:)
    integer, intent(in) :: start, last
    integer :: root, child
    real(8) :: t
    root = start
    do while (2 * root <= last)
      child = 2 * root
      if (child < last) then
        if (a(child) < a(child + 1)) child = child + 1
      end if
      if (a(root) >= a(child)) return
      t = a(root); a(root) = a(child); a(child) = t
      root = child
    end do
  end subroutine sift
end program bench
